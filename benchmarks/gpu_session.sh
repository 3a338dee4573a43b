#!/usr/bin/env bash
# The GPU work of one lent H200 session, in priority order: the fetch path's tokens on CUDA, then issue 9's
# side-by-side tables (benchmarks/issue9.sh). Runs detached (benchmarks/detach.sh) so that it outlives one
# device call's 10-minute limit; every step writes into RESULTS as it goes and is capped by `timeout`.
#   bash benchmarks/detach.sh start /tmp/zr bash benchmarks/on_device.sh bash benchmarks/gpu_session.sh /tmp/zr
#   bash benchmarks/detach.sh wait /tmp/zr 540   # in each device call, until it prints an exit status
set -uo pipefail
RESULTS=${1:?usage: gpu_session.sh RESULTS_DIR}
mkdir -p "$RESULTS"
echo "=== $(date -u +%T) greedy tokens on CUDA: memory.fetch deepspeed vs overlap"
for model in "model=tiny-opt model.dtype=float16 batch=2" "model=opt-1.3b batch=4"; do
  # shellcheck disable=SC2086
  timeout 240 python3 benchmarks/fetch_tokens_match.py $model 2>&1 | grep -E "greedy tokens|Error|error" \
    | tee -a "$RESULTS/tokens.txt"
done
bash benchmarks/issue9.sh "$RESULTS"
