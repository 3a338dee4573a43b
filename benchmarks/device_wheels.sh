#!/usr/bin/env bash
# Fills .whl/ with the wheels benchmarks/on_device.sh installs on the lent GPU machine, which has no network and
# lacks DeepSpeed, Hydra and MLflow (it has Python 3.12, torch, torchvision with pillow, transformers, accelerate,
# numpy, psutil: the device library's KINDS.md). Versions are the ones this checkout's .venv resolved, so the
# device runs what the tests ran; compiled packages are fetched for CPython 3.12 on manylinux x86_64; DeepSpeed's
# wheel is built without ops (they are JIT-built on the device, with TORCH_CUDA_ARCH_LIST=9.0). A call carries at
# most 64 MiB: this list comes to about 49 MB.
#   bash install.sh && bash benchmarks/device_wheels.sh    # then carry .whl in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# What the app, the plugins and the benchmarks import on the device, with their own imports, less what it has.
PACKAGES="deepspeed hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection msgpack einops
  hydra-core omegaconf antlr4-python3-runtime mlflow mlflow-skinny mlflow-tracing sqlalchemy greenlet alembic mako
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions protobuf cachetools
  databricks-sdk google-auth pyasn1 pyasn1-modules sqlparse gitpython gitdb smmap cloudpickle importlib-metadata
  zipp click python-dotenv matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
  tqdm fastapi starlette annotated-doc anyio h11 httpx2 httpcore2 truststore cryptography cffi pycparser"
rm -rf .whl && mkdir -p .whl
for name in $PACKAGES; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
    echo "skip $name: not in .venv"; continue; }
  # Compiled packages come as CPython 3.12 wheels; the few published only as sdists (DeepSpeed,
  # antlr4-python3-runtime) are pure Python and are built into wheels here.
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
      -d .whl "$name==$version" 2>/dev/null \
    || DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "$name==$version"
done
# FlexGen, the peer of benchmarks/peers/ (not a dependency of ours): pure Python, with attrs.
$PY -m pip download -q --no-deps -d .whl flexgen==0.1.8 attrs
du -sh .whl
