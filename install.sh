#!/usr/bin/env bash
# Creates .venv with hydra-zero-inference (editable, with test extras) and a torch that fits the machine:
# a torch the system Python already has (e.g. a CUDA build on a GPU machine) is kept; otherwise the CPU
# build 2.13.0 is installed, never an unpinned multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[test]'
# DeepSpeed's JIT-built ops (shm_comm, pin_memory, and async_io where libaio is installed) into
# .venv/torch_extensions now, about 2 min on 2 idle cores, rather than in the first job that needs each.
.venv/bin/python -m zi_app.run.build_ops \
  || echo "install.sh: DeepSpeed's ops were not prebuilt (see above); the first job needing each builds it" >&2
echo "installed: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1)"
