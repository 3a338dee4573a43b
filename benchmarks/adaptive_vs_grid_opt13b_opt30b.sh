#!/usr/bin/env bash
# The adaptive sweep against the full grid (benchmarks/adaptive_vs_grid.sh) on one H200, for both models of
# issue 10: OPT-13B under 24 GiB and OPT-30B under 48 GiB, batch x pin, both sweeps in the same call. The planner's
# accuracy points that this script ran before are recorded with their commands in docs/results/opt1-3b_*.json.
# Every step writes its table as it goes and is capped by `timeout`, so a cut session keeps what finished. Run
# detached:
#   bash benchmarks/detach.sh start /tmp/z10 bash benchmarks/on_device.sh bash benchmarks/adaptive_vs_grid_opt13b_opt30b.sh /tmp/z10
#   bash benchmarks/detach.sh wait /tmp/z10 540   # in each device call, until it prints an exit status
set -uo pipefail
RESULTS=${1:?usage: adaptive_vs_grid_opt13b_opt30b.sh RESULTS_DIR}
mkdir -p "$RESULTS"
step() { echo "=== $(date -u +%T) $1"; }

# One timed generate of 4 tokens per job and no warm-up: both sweeps run the same jobs, and the two grids (14
# jobs that load a model, 6 of them pageable) and the two adaptive sweeps fit the 30 minutes of device time a
# session has. A job's fixed cost (process start, 26-60 GB load) was 45-90 s either way (call 8: each job's
# time less its timed generate).
step "adaptive sweep against the full grid: OPT-13B under 24 GiB"
COMMON="gen_len=4 warmup=0 repeat=1" RESULTS_DIR=$RESULTS timeout 1200 bash benchmarks/adaptive_vs_grid.sh opt-13b 1,8,32,48,64
step "adaptive sweep against the full grid: OPT-30B under 48 GiB"
COMMON="gen_len=4 warmup=0 repeat=1" RESULTS_DIR=$RESULTS timeout 1500 bash benchmarks/adaptive_vs_grid.sh opt-30b 8,32,48,64
step "done"
