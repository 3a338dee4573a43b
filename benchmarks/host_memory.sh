#!/usr/bin/env bash
# Host memory of offloaded weights (issue 20), measured side by side on one GPU machine:
# 1. OPT-13B fp16, batch 32, every weight streamed (memory.persistence=h), pinned: partitions pinned by torch's
#    caching host allocator (each rounded up to a power of two) against DeepSpeed's native backend (own size);
# 2. OPT-66B int4 under a 48 GiB GPU budget, batch 16: random weights made as ZeRO-3 takes each module (no
#    fp16 copy, no checkpoint on the 64 GiB disk), the first model above 30B this tool runs.
# Usage on the device: bash benchmarks/on_device.sh bash benchmarks/host_memory.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/host_memory}
mkdir -p "$OUT"
STORE="sqlite:////tmp/host_memory/mlflow.db"
mkdir -p /tmp/host_memory
timeout 300 python3 benchmarks/compare.py --store "$STORE" \
  --title "OPT-13B fp16 batch 32, every weight streamed, pinned: torch's host allocator against DeepSpeed's native backend" \
  --common model=opt-13b batch=32 memory.persistence=h pin=true gen_len=8 warmup=1 repeat=1 \
  --variant torch memory.pin_backend=torch --variant native memory.pin_backend=native \
  --out "$OUT/opt13b_pin_backends"
timeout 420 python3 benchmarks/compare.py --store "$STORE" \
  --title "OPT-66B int4 under 48 GiB, batch 16: random weights made under ZeRO-3, pinned by the native backend" \
  --common model=opt-66b quant=int4 batch=16 memory.gpu_budget_gib=48 gen_len=8 warmup=0 repeat=1 \
  --variant tuned memory=tuned \
  --out "$OUT/opt66b_int4_48gib"
