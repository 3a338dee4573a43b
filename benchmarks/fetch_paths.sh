#!/usr/bin/env bash
# The fetch paths side by side on one H200 (issue 9): memory.fetch=deepspeed against overlap, and the
# resident-weights hook tax against the model run plainly on the GPU; every table with the reference
# configuration in the same compare.py call.
# Priority order; each step is capped by `timeout` and writes its table as it goes, so a cut session keeps
# what finished. About 20 minutes of GPU time, the int4 source checkpoint included. Run detached so that it
# outlives one device call's 10-minute limit:
#   bash benchmarks/detach.sh start /tmp/z9 bash benchmarks/on_device.sh bash benchmarks/fetch_paths.sh /tmp/z9
#   bash benchmarks/detach.sh wait /tmp/z9 540   # in each device call, until it prints an exit status
# (results land in $OUT as results.tgz), or in a single call:
#   bash benchmarks/on_device.sh bash benchmarks/fetch_paths.sh
set -uo pipefail
RESULTS=${1:-${OUT:?usage: fetch_paths.sh RESULTS_DIR (default \$OUT/fetch_paths)}/fetch_paths}
mkdir -p "$RESULTS"
step() { echo "=== $(date -u +%T) $1"; }
FAST="pin=true prompt_len=512 gen_len=16 warmup=1 repeat=1"

step "OPT-13B fp16 batch 32: every weight streamed, deepspeed vs overlap (step profiles), and under 24 GiB"
timeout 480 python3 benchmarks/compare.py --title "OPT-13B fp16, batch 32, pinned: memory.fetch deepspeed vs overlap" \
  --common model=opt-13b batch=32 $FAST profile_step=true \
  --variant reference memory=reference \
  --variant streamed-deepspeed memory=tuned memory.persistence=h memory.fetch=deepspeed \
  --variant streamed-overlap memory=tuned memory.persistence=h memory.fetch=overlap \
  --variant 24gib-overlap memory=tuned memory.gpu_budget_gib=24 memory.fetch=overlap \
  --out "$RESULTS/opt13b_fp16_fetch"

step "OPT-6.7B fp16 batch 32, whole card (every weight resident): ZeRO-3 hooks vs none vs plain transformers"
timeout 240 python3 benchmarks/compare.py --title "OPT-6.7B fp16, batch 32, whole card: the hook tax" \
  --common model=opt-6.7b batch=32 $FAST \
  --variant resident-deepspeed memory=tuned memory.fetch=deepspeed \
  --variant resident-overlap memory=tuned memory.fetch=overlap \
  --plain-gpu plain-gpu \
  --out "$RESULTS/opt67b_resident"

step "OPT-30B fp16 under 48 GiB, batch 24, 16 new tokens: reference vs tuned with overlap"
timeout 420 python3 benchmarks/compare.py --title "OPT-30B arch, 48 GiB budget, batch 24, pinned" \
  --common model=opt-30b memory.gpu_budget_gib=48 batch=24 $FAST \
  --variant reference memory=reference \
  --variant tuned-overlap memory=tuned memory.fetch=overlap \
  --out "$RESULTS/opt30b_48gib_b24_fetch"

step "OPT-13B int4 (init-time, group 64) batch 32, every weight streamed: reference vs overlap"
timeout 420 python3 benchmarks/compare.py --title "OPT-13B int4 (init-time, group 64), batch 32, pinned" \
  --common model=opt-13b quant=int4 batch=32 $FAST \
  --variant reference memory=reference \
  --variant streamed-overlap memory=tuned memory.persistence=h memory.fetch=overlap \
  --out "$RESULTS/opt13b_int4_fetch"
rm -rf /tmp/zi-cache/random-*  # 26 GB of random source weights
step "done"
