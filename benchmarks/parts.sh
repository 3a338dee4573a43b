# Sourced by the device benchmarks that run in parts (one part per device call): `parts_setup NAME "$@"` takes
# OUT and PART from the script's arguments and gives the part its MLflow store under /tmp/NAME, which the
# calls of one warm machine share.
parts_setup() {
  local name=$1
  OUT=${2:?usage: $name.sh OUT PART}
  PART=${3:?usage: $name.sh OUT PART}
  mkdir -p "$OUT" "/tmp/$name"
  STORE="sqlite:////tmp/$name/mlflow.db"
}
