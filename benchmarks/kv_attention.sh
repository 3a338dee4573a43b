#!/usr/bin/env bash
# KV offload that pays (issue 21 item 1): where a decode step attends over an offloaded KV cache, on the GPU over
# each layer's prefix copied up (kvcache=cpu) or on the CPU where the cache lives (kvcache.attention=host), against
# the cache on the GPU, for OPT-30B and OPT-66B int4 under an A6000-sized budget (memory.gpu_budget_gib=48),
# prompt 512, 32 new tokens, every weight streamed. First the host's attention alone (benchmarks/cpu_attention.py:
# its GB/s is hardware.host_attention_gbps, a guess until this runs), then the jobs; FlexGen's, in the same
# session, is benchmarks/peers/flexgen_sweep.sh. One part per device call, chained on one warm machine:
#   bash benchmarks/on_device.sh bash benchmarks/kv_attention.sh "$OUT" probe|opt30b|opt30b_host|opt66b|quant|quant_profile
set -uo pipefail
source "$(dirname "$0")/parts.sh"
parts_setup kv_attention "$@"
COMMON="quant=int4 memory.gpu_budget_gib=48 prompt_len=512 gen_len=32 warmup=1 repeat=1 memory=tuned memory.persistence=h"

paths() {  # paths <model> <name> <GPU KV batch> <offloaded batches...>: the GPU cache at its largest batch, then both offloaded paths
  local model=$1 name=$2 gpu_batch=$3
  shift 3
  local variants=(--variant "gpu_b$gpu_batch" kvcache=gpu batch="$gpu_batch")
  for batch in "$@"; do
    variants+=(--variant "copy_up_b$batch" kvcache=cpu batch="$batch" --variant "host_b$batch" kvcache=cpu kvcache.attention=host batch="$batch")
  done
  compare 300 "$name" "$model int4 under 48 GiB: the KV cache on the GPU, in host memory attended on the GPU (copied up) or on the host" \
    --common model="$model" $COMMON "${variants[@]}"
}

case $PART in
probe) python3 benchmarks/cpu_attention.py --model opt-30b --batch 16 64 128 --context 544 | tee "$OUT/cpu_attention_opt30b.md"
       python3 benchmarks/cpu_attention.py --model opt-66b --batch 16 64 --context 544 | tee "$OUT/cpu_attention_opt66b.md" ;;
opt30b) paths opt-30b opt30b_int4_48gib_kv_attention 24 64 128 ;;
opt30b_host)  # after the prefill's padded copy (2026-12-06): both offloaded paths at batch 64 and 128, no GPU cache
  compare 300 opt30b_int4_48gib_kv_host "opt-30b int4 under 48 GiB: the offloaded KV cache copied up or attended on the host" \
    --common model=opt-30b $COMMON kvcache=cpu --variant copy_up_b64 batch=64 \
    --variant host_b64 kvcache.attention=host batch=64 --variant host_b128 kvcache.attention=host batch=128 ;;
opt66b) paths opt-66b opt66b_int4_48gib_kv_attention 16 32 64 ;;
quant)  # KV offload that pays (the planner's prediction, 2026-12-06), OPT-66B first (the larger predicted gain):
  # 64.6 against 35.4 tokens/s planned on the H100 preset (batch 192, 101 GiB of host memory, against batch 32)
  compare 420 opt66b_int4_48gib_kv_quant "opt-66b int4 under 48 GiB: the GPU cache at its largest batch, the host cache quantized to int4" \
    --common model=opt-66b $COMMON --variant gpu_b32 kvcache=gpu batch=32 \
    --variant int4_kv_b192 kvcache=cpu kvcache.quant=int4 batch=192
  # OPT-30B: 130.8 against 114.5 tokens/s planned
  compare 300 opt30b_int4_48gib_kv_quant "opt-30b int4 under 48 GiB: the GPU cache at its largest batch, the host cache quantized to int4 and int8" \
    --common model=opt-30b $COMMON --variant gpu_b56 kvcache=gpu batch=56 \
    --variant int4_kv_b256 kvcache=cpu kvcache.quant=int4 batch=256 --variant int4_kv_b128 kvcache=cpu kvcache.quant=int4 batch=128 \
    --variant int8_kv_b128 kvcache=cpu kvcache.quant=int8 batch=128 ;;
quant_profile)  # where an int4 host cache's decode step goes (profile_step: copies, kernels, host waits), batch 256
  compare 300 opt30b_int4_48gib_kv_quant_profile "opt-30b int4 under 48 GiB, batch 256, the host cache in int4: one decode step profiled" \
    --common model=opt-30b $COMMON kvcache=cpu kvcache.quant=int4 batch=256 profile_step=true --variant int4_kv_b256 ;;
*) echo "unknown part $PART: probe, opt30b, opt30b_host, opt66b, quant or quant_profile" >&2; exit 2 ;;
esac
cp /tmp/kv_attention/mlflow.db "$OUT/mlflow.db" 2>/dev/null || true
