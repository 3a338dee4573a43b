# Sourced by the device benchmarks that run in parts (one part per device call): `parts_setup NAME "$@"` takes
# OUT and PART from the script's arguments and gives the part its MLflow store under /tmp/NAME, which the
# calls of one warm machine share; `compare` runs benchmarks/compare.py into that store and OUT.
parts_setup() {
  local name=$1
  OUT=${2:?usage: $name.sh OUT PART}
  PART=${3:?usage: $name.sh OUT PART}
  mkdir -p "$OUT" "/tmp/$name"
  STORE="sqlite:////tmp/$name/mlflow.db"
}

compare() {  # compare <seconds per variant> <out name> <title> <compare.py arguments...>
  local timeout=$1 name=$2 title=$3
  shift 3
  python3 benchmarks/compare.py --store "$STORE" --timeout "$timeout" --title "$title" "$@" --out "$OUT/$name"
}
