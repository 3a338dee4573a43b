#!/usr/bin/env bash
# Prepares the lent GPU machine (no network): installs the carried wheels (.whl/) into /tmp/site, puts the
# repository on PYTHONPATH (zi_app and hydra_plugins run from the checkout), then runs "$@".
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || { echo "wheel install failed"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 ZI_CACHE_DIR=/tmp/zi-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, deepspeed, transformers, hydra, mlflow; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__, "hydra", hydra.__version__, "mlflow", mlflow.__version__)' 2>&1 | tail -1
exec "$@"
