#!/usr/bin/env bash
# The 175B class with int4 weights on one GPU under an A6000-sized budget (issue 20 item 5): prompt 512, 32 new
# tokens, memory.gpu_budget_gib=48, random weights made as ZeRO-3 partitions them (no checkpoint on the 64 GiB
# disk). Each model once with the KV cache on the GPU and once in host memory (kvcache=cpu, our cache allocated
# once at its final length), and memory=reference (DeepSpeed's own settings and pinning) at the first point; a
# point the plan refuses (host memory) is recorded as refused before loading. The plan is hardware=auto's.
# One part per device call (each fits its 10-minute limit), chained on one warm machine:
#   bash benchmarks/on_device.sh bash benchmarks/int4_175b_class.sh "$OUT" kv|kv_tokens|llama|llama_kv|opt175b|bloom|bloom_rest|opt66b|resident
set -uo pipefail
source "$(dirname "$0")/parts.sh"
parts_setup int4_175b_class "$@"
BIG="quant=int4 memory.gpu_budget_gib=48 prompt_len=512 gen_len=32 warmup=1 repeat=1"
STREAMED="memory=tuned memory.persistence=h"  # every weight streamed (the planner's residency: memory=tuned alone)
OPT67_B64="model=opt-6.7b batch=64 memory.gpu_budget_gib=24 prompt_len=512 gen_len=8 warmup=1 repeat=1 memory=tuned"

case $PART in
kv)  # the cited case: transformers' offloaded cache held 78.5 GiB of host memory for a 17 GB cache
  compare 150 opt67b_b64_kv_paths "OPT-6.7B fp16 batch 64 under 24 GiB: the KV cache on the GPU, in our host cache, in transformers' offloaded cache" \
    --common $OPT67_B64 \
    --variant gpu kvcache=gpu --variant cpu kvcache=cpu --variant cpu_transformers kvcache=cpu_transformers ;;
kv_tokens)  # the same, our cache against the GPU's only: are the greedy tokens identical on CUDA
  compare 150 opt67b_b64_kv_tokens "OPT-6.7B fp16 batch 64 under 24 GiB: greedy tokens with the KV cache on the GPU and in our host cache" \
    --common $OPT67_B64 \
    --variant gpu kvcache=gpu --variant cpu kvcache=cpu ;;
llama)  # every weight streamed (GPU KV, then our host KV cache), then DeepSpeed's settings
  compare 300 llama2_70b_int4_48gib "Llama-2-70B int4 under 48 GiB, batch 16" --common model=llama-2-70b batch=16 $BIG \
    --variant streamed memory=tuned memory.persistence=h --variant kv_cpu memory=tuned memory.persistence=h kvcache=cpu \
    --variant reference memory=reference ;;
llama_kv)  # the short form: every weight streamed, our host KV cache first, then the GPU cache (same tokens?)
  compare 200 llama2_70b_int4_48gib_kv "Llama-2-70B int4 under 48 GiB, batch 16, every weight streamed: the KV cache in our host cache and on the GPU" \
    --common model=llama-2-70b batch=16 $BIG memory=tuned memory.persistence=h --variant kv_cpu kvcache=cpu --variant kv_gpu kvcache=gpu ;;
opt175b)
  compare 290 opt175b_int4_48gib "OPT-175B int4 under 48 GiB" --common model=opt-175b $BIG \
    --variant gpu_kv_b12 batch=12 $STREAMED --variant cpu_kv_b8 batch=8 kvcache=cpu $STREAMED \
    --variant reference_b12 batch=12 memory=reference ;;
bloom)
  compare 290 bloom176b_int4_48gib "BLOOM-176B int4 under 48 GiB" --common model=bloom-176b $BIG \
    --variant gpu_kv_b12 batch=12 $STREAMED --variant cpu_kv_b8 batch=8 kvcache=cpu $STREAMED \
    --variant reference_b12 batch=12 memory=reference ;;
bloom_rest)  # what the 2026-12-05 session left: DeepSpeed's settings at batch 12, and where BLOOM's step and GPU peak go
  compare 290 bloom176b_int4_48gib_rest "BLOOM-176B int4 under 48 GiB, batch 12: DeepSpeed's settings; every weight streamed, one decode step profiled" \
    --common model=bloom-176b batch=12 $BIG --variant reference memory=reference \
    --variant profiled $STREAMED profile_step=true ;;
opt66b)
  compare 300 opt66b_int4_48gib_kv "OPT-66B int4 under 48 GiB, batch 16, every weight streamed: the KV cache on the GPU and in our host cache; DeepSpeed's settings" \
    --common model=opt-66b batch=16 $BIG --variant gpu memory=tuned memory.persistence=h \
    --variant cpu memory=tuned memory.persistence=h kvcache=cpu --variant reference memory=reference ;;
resident)  # the planner's residency (memory=tuned): out of GPU memory on 2026-12-05, before ZeRO-3's packed int4 sizes were planned
  compare 300 int4_48gib_resident "OPT-66B and Llama-2-70B int4 under 48 GiB, batch 16, the planner's residency (memory=tuned)" \
    --common batch=16 $BIG memory=tuned --variant opt66b model=opt-66b --variant llama2_70b model=llama-2-70b ;;
*) echo "unknown part $PART: kv, kv_tokens, llama, llama_kv, opt175b, bloom, bloom_rest, opt66b or resident" >&2; exit 2 ;;
esac
cp /tmp/int4_175b_class/mlflow.db "$OUT/mlflow.db" 2>/dev/null || true
