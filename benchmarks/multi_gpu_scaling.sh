#!/usr/bin/env bash
# Multi-GPU scaling (issue 12) on a multi-GPU H200 machine (nvidia-h200-x2 or -x4): one job across 1, 2 and 4
# GPUs at the same per-GPU budget (48 GiB) and per-rank batch (24), reference against tuned, then OPT-66B fp16
# on 4 GPUs and Llama-2-70B int4 on 2. Steps that need more GPUs than the machine has are skipped, with a line saying so.
# Each compare.py call runs its variants side by side in one call; benchmarks/scaling.py then prints tokens/s
# against the 1-GPU run of the same setting beside the ideal N x. The planner's predictions for the same points
# come first (no GPU work). Every step is capped by `timeout` and writes its table as it goes. Run detached:
#   bash benchmarks/detach.sh start /tmp/z12 bash benchmarks/on_device.sh bash benchmarks/multi_gpu_scaling.sh /tmp/z12
#   bash benchmarks/detach.sh wait /tmp/z12 570   # in each device call, until it prints an exit status
set -uo pipefail
RESULTS=${1:?usage: multi_gpu_scaling.sh RESULTS_DIR}
mkdir -p "$RESULTS"
step() { echo "=== $(date -u +%T) $1"; }
GPUS=$(nvidia-smi --list-gpus | wc -l)
PER_GPU="memory.gpu_budget_gib=48 batch=24 pin=true prompt_len=512 gen_len=16 warmup=1 repeat=1"
# OPT-30B on 1, 2 and (when the machine has them) 4 GPUs, reference and tuned memory.
COUNTS=$( ((GPUS >= 4)) && echo "1 2 4" || echo "1 2")
VARIANTS=()
for n in $COUNTS; do
  VARIANTS+=(--variant "reference-${n}gpu" memory=reference "devices=$n" --variant "tuned-${n}gpu" memory=tuned "devices=$n")
done
step "machine: $GPUS GPUs; OPT-30B on $COUNTS GPUs"

step "planner: the same points, predicted (hardware=auto: this machine's GPUs, host memory and links)"
python3 -m zi_app.zi_plan model=opt-30b $PER_GPU memory=reference,tuned devices="${COUNTS// /,}" | tee "$RESULTS/plan_opt30b.txt"

step "OPT-30B fp16, 48 GiB per GPU, batch 24 per rank: 1 to $GPUS GPUs, reference and tuned"
timeout 1200 python3 benchmarks/compare.py --title "OPT-30B fp16, 48 GiB and batch 24 per GPU, pinned: 1 to ${COUNTS##* } GPUs" \
  --common model=opt-30b $PER_GPU "${VARIANTS[@]}" --out "$RESULTS/opt30b_multi_gpu"
python3 benchmarks/scaling.py "$RESULTS/opt30b_multi_gpu.json" | tee "$RESULTS/opt30b_multi_gpu_scaling.md"

if ((GPUS >= 4)); then
  step "OPT-66B fp16 on 4 GPUs, 48 GiB and batch 24 per GPU, reference and tuned"
  timeout 1200 python3 benchmarks/compare.py --title "OPT-66B fp16 on 4 GPUs, 48 GiB and batch 24 per GPU, pinned" \
    --common model=opt-66b devices=4 $PER_GPU --variant reference memory=reference --variant tuned memory=tuned \
    --out "$RESULTS/opt66b_4gpu"
else
  step "skipped: OPT-66B fp16 on 4 GPUs (this machine has $GPUS)"
fi

step "Llama-2-70B int4 on 2 GPUs, 48 GiB and batch 24 per GPU, reference and tuned"
timeout 1200 python3 benchmarks/compare.py --title "Llama-2-70B int4 on 2 GPUs, 48 GiB and batch 24 per GPU, pinned" \
  --common model=llama-2-70b quant=int4 devices=2 $PER_GPU --variant reference memory=reference --variant tuned memory=tuned \
  --out "$RESULTS/llama2-70b_int4_2gpu"
step "done"
