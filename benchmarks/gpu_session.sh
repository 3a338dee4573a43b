#!/usr/bin/env bash
# The GPU work of the sweeps and performance issues, in priority order, for one lent H200 session.
# Runs detached (benchmarks/detach.sh) so that it outlives one device call's 10-minute limit; every step
# writes into RESULTS as it goes and is capped by `timeout`, so a cut session keeps what finished.
#   bash benchmarks/detach.sh start /tmp/zr bash benchmarks/on_device.sh bash benchmarks/gpu_session.sh /tmp/zr
#   bash benchmarks/detach.sh wait /tmp/zr 540   # in each device call, until it prints an exit status
set -uo pipefail
RESULTS=${1:?usage: gpu_session.sh RESULTS_DIR}
mkdir -p "$RESULTS"
step() { echo "=== $(date -u +%T) $1"; }

step "int4 (init-time, group 64), OPT-13B batch 32: reference vs tuned residency, with a step profile"
timeout 900 python3 benchmarks/compare.py --title "OPT-13B int4 (init-time, group 64), batch 32, pinned" \
  --common model=opt-13b quant=int4 batch=32 pin=true warmup=1 repeat=1 profile_step=true \
  --variant reference memory=reference \
  --variant leaf+prefetch+reuse memory=tuned memory.persistence=h \
  --out "$RESULTS/opt13b_int4_b32"
rm -rf /tmp/zi-cache/random-*  # 26 GB of random int4 source weights; the 64 GiB disk needs the room

step "sweep: OPT-13B reference under 24 GiB, batch x pin"
timeout 1200 python3 -m zi_app -m model=opt-13b memory=reference memory.gpu_budget_gib=24 \
  batch=1,8,32,64,128,192 pin=true,false gen_len=8 warmup=1 repeat=1 2>&1 | tee "$RESULTS/opt13b_sweep.log"
python3 -m zi_app.best 2>&1 | tee "$RESULTS/opt13b_sweep_best.txt"
mkdir -p "$RESULTS/mlruns" && cp -r mlruns/mlflow.db mlruns/artifacts "$RESULTS/mlruns/"

step "fp16 OPT-13B batch 32: where a decode step's time goes, reference vs tuned (everything streamed)"
timeout 600 python3 benchmarks/compare.py --title "OPT-13B fp16, batch 32, pinned: step profile" \
  --common model=opt-13b batch=32 pin=true warmup=1 repeat=1 profile_step=true \
  --variant reference memory=reference \
  --variant leaf+prefetch+reuse memory=tuned memory.persistence=h \
  --out "$RESULTS/opt13b_fp16_profile"

step "OPT-30B under 48 GiB at the largest batch both configurations fit (48)"
timeout 700 python3 benchmarks/compare.py --title "OPT-30B arch, 48 GiB budget, batch 48, pinned" \
  --common model=opt-30b memory.gpu_budget_gib=48 batch=48 pin=true gen_len=16 warmup=1 repeat=1 \
  --variant reference memory=reference \
  --variant tuned memory=tuned \
  --out "$RESULTS/opt30b_48gib_b48"
step "done"
