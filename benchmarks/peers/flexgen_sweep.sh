#!/usr/bin/env bash
# FlexGen 0.1.8 beside ours (issue 21 item 4): flexgen.flex_opt on OPT-30B and OPT-66B with dummy weights, prompt
# 512, 32 new tokens, under the same 48 GiB GPU budget, for the seed table's two int4 rows: weights int4 on the
# CPU with the KV cache on the GPU (int4_kv_gpu), with the KV cache on the CPU and attention computed there
# (int4_kv_cpu: FlexGen's --cpu-cache-compute), and with FlexGen's own 4-bit cache on the CPU, copied up and
# attended on the GPU (int4_kvq_cpu: --compress-cache, as our kvcache=cpu kvcache.quant=int4). One run per
# POLICY:BATCH (default: the first two policies at batches 8 16 32 64); each prints one `flexgen-result {...}`
# line (flexgen_opt.py) and the table of all of them goes to $OUT/flexgen_<model>.md; a run that prints none is
# listed with its exit status (137: killed, e.g. by the kernel's out-of-memory killer; 124: over its time). Run on
# the device after benchmarks/device_wheels.sh (which fetches flexgen==0.1.8 and attrs into .whl/):
#   bash benchmarks/on_device.sh bash benchmarks/peers/flexgen_sweep.sh "$OUT" opt-30b [int4_kv_gpu:24 int4_kv_cpu:64 ...]
set -uo pipefail
OUT=${1:?usage: flexgen_sweep.sh OUT opt-30b|opt-66b [POLICY:BATCH...]}
MODEL=${2:?usage: flexgen_sweep.sh OUT opt-30b|opt-66b [POLICY:BATCH...]}
shift 2
mkdir -p "$OUT" /tmp/flexgen_offload
RESULTS="$OUT/flexgen_${MODEL}.jsonl"
declare -A POLICY=(  # --percent: weights GPU CPU, KV cache GPU CPU, activations GPU CPU
  [int4_kv_gpu]="--percent 0 100 100 0 100 0 --compress-weight"
  [int4_kv_cpu]="--percent 0 100 0 100 100 0 --compress-weight --cpu-cache-compute"
  [int4_kvq_cpu]="--percent 0 100 0 100 100 0 --compress-weight --compress-cache")
runs=("$@")
((${#runs[@]})) || for name in int4_kv_gpu int4_kv_cpu; do for batch in 8 16 32 64; do runs+=("$name:$batch"); done; done
for run in "${runs[@]}"; do
  name=${run%%:*} batch=${run#*:}
  [[ -n ${POLICY[$name]:-} ]] || { echo "unknown policy $name: one of ${!POLICY[*]}" >&2; exit 2; }
  echo "== flexgen $MODEL $name batch $batch"
  log="$OUT/flexgen_${MODEL}_${name}_b${batch}.log"
  timeout 570 python3 benchmarks/peers/flexgen_opt.py --gpu-budget-gib 48 -- --model "facebook/$MODEL" --path _DUMMY_ \
    --offload-dir /tmp/flexgen_offload --prompt-len 512 --gen-len 32 --gpu-batch-size "$batch" --num-gpu-batches 1 \
    ${POLICY[$name]} --verbose 1 > "$log" 2>&1
  status=$?
  grep "^flexgen-result" "$log" | sed "s/^flexgen-result /{\"policy\": \"$name\", \"batch\": $batch, \"run\": /; s/\$/}/" >> "$RESULTS" \
    || echo "{\"policy\": \"$name\", \"batch\": $batch, \"failed\": \"exit $status: $(tail -1 "$log" | tr -d '"\\')\"}" >> "$RESULTS"
done
python3 - "$RESULTS" "$OUT/flexgen_${MODEL}.md" "$MODEL" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
lines = [f"### FlexGen 0.1.8, {sys.argv[3]}, prompt 512, 32 tokens, GPU capped at 48 GiB", "",
         "| policy | batch | tokens/s | decode tokens/s | peak GPU GB | peak host GiB | prefill s | decode s |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    m = r.get("run", {})
    lines.append(f"| {r['policy']} | {r['batch']} | " + (" | ".join(str(m.get(k, "")) for k in (
        "tokens_per_sec", "decode_tokens_per_sec", "peak_gpu_gb", "peak_host_gib", "prefill_s", "decode_s")) if m
        else f"failed: {r.get('failed', '')} | | | | |") + " |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
