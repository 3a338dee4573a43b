#!/usr/bin/env bash
# The fetch-path session of one lent H200 (issue 9), in priority order: greedy tokens of memory.fetch=deepspeed
# and overlap compared on CUDA, then the side-by-side tables (benchmarks/fetch_paths.sh). Runs detached
# (benchmarks/detach.sh) so that it outlives one device call's 10-minute limit; every step writes into RESULTS
# as it goes and is capped by `timeout`.
#   bash benchmarks/detach.sh start /tmp/zr bash benchmarks/on_device.sh bash benchmarks/fetch_paths_session.sh /tmp/zr
#   bash benchmarks/detach.sh wait /tmp/zr 540   # in each device call, until it prints an exit status
set -uo pipefail
RESULTS=${1:?usage: fetch_paths_session.sh RESULTS_DIR}
mkdir -p "$RESULTS"
echo "=== $(date -u +%T) greedy tokens on CUDA: memory.fetch deepspeed vs overlap"
for model in "model=tiny-opt model.dtype=float16 batch=2" "model=opt-1.3b batch=4"; do
  # shellcheck disable=SC2086
  timeout 240 python3 benchmarks/fetch_tokens_match.py $model 2>&1 | grep -E "greedy tokens|Error|error" \
    | tee -a "$RESULTS/tokens.txt"
done
bash benchmarks/fetch_paths.sh "$RESULTS"
