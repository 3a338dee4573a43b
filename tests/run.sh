#!/usr/bin/env bash
# The full test suite, as the README and CI run it: installs the system packages its tests need (apt, only
# those missing), then runs pytest with the arguments given (e.g. `bash tests/run.sh -m quick`).
# libaio-dev: DeepSpeed's async_io op (NVMe offload); chromium, chromium-driver: the MLflow UI test;
# postgresql: the tracking server's database; slurm-wlm, munge: the one-node SLURM cluster. The tests'
# own fixtures start and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(libaio-dev chromium chromium-driver postgresql slurm-wlm munge)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]]; then sudo=()
    elif command -v sudo >/dev/null; then sudo=(sudo)
    else
        echo "tests/run.sh: missing system packages: ${missing[*]}; install them as root (apt-get install ${missing[*]}) and run again" >&2
        exit 1
    fi
    echo "tests/run.sh: installing ${missing[*]} (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    # libaio arrived after install.sh: build DeepSpeed's async_io op now, once, not in the first NVMe test.
    if [[ " ${missing[*]} " == *" libaio-dev "* ]]; then .venv/bin/python -m zi_app.run.build_ops >&2; fi
fi
exec .venv/bin/python -m pytest -q "$@"
