#!/usr/bin/env bash
# The adaptive sweep against the full grid, in one invocation, for one model under its GPU budget (batch x pin):
# runs `-m` over the whole grid (the basic sweeper), then `-m hydra/sweeper=adaptive` over the same grid, each
# into its own MLflow experiment of one fresh store, and prints the comparison: jobs run, best tokens/s of each,
# their ratio, and the issue's goal (>= 95% of the grid's best with <= half its jobs).
#   bash benchmarks/adaptive_vs_grid.sh opt-13b                      # 24 GiB budget, batch=1,8,32,64,128,192
#   bash benchmarks/adaptive_vs_grid.sh opt-30b 1,8,16,32,48,64      # 48 GiB budget, this batch list
# Writes under $RESULTS_DIR (default $OUT)/adaptive_vs_grid_<model>/: both sweeps' logs, the store, comparison.md.
# Longer than one device call: run it detached, as fetch_paths_session.sh is, e.g.
#   RESULTS_DIR=/tmp/avg bash benchmarks/detach.sh start /tmp/avg bash benchmarks/on_device.sh \
#     bash benchmarks/adaptive_vs_grid.sh opt-13b
#   bash benchmarks/detach.sh wait /tmp/avg 540   # in each device call, until it prints an exit status
# Extra overrides after the batch list go to both sweeps; COMMON (gen_len=8 warmup=1 repeat=1) likewise.
set -uo pipefail
MODEL=${1:?usage: adaptive_vs_grid.sh MODEL [BATCHES] [OVERRIDES...]}
case $MODEL in
  opt-13b) BUDGET=24 BATCHES=${2:-1,8,32,64,128,192} ;;
  opt-30b) BUDGET=48 BATCHES=${2:-1,8,16,32,48,64} ;;
  *) BUDGET=${BUDGET:?set BUDGET (GiB) for $MODEL} BATCHES=${2:?give the batch list for $MODEL} ;;
esac
shift $(($# >= 2 ? 2 : 1))
DIR=${RESULTS_DIR:-${OUT:?set OUT or RESULTS_DIR}}/adaptive_vs_grid_$MODEL
mkdir -p "$DIR"
STORE="sqlite:///$(cd "$DIR" && pwd)/mlruns/mlflow.db"
read -r -a COMMON <<<"${COMMON:-gen_len=8 warmup=1 repeat=1}"
GRID=(model="$MODEL" memory.gpu_budget_gib="$BUDGET" batch="$BATCHES" pin=true,false "${COMMON[@]}" "$@")
step() { echo "=== $(date -u +%T) $1"; }

step "full grid: ${GRID[*]}"
timeout 3600 python3 -m zi_app -m "${GRID[@]}" tracking.uri="$STORE" tracking.experiment=grid hydra.sweep.dir="$DIR/grid" 2>&1 \
  | tee "$DIR/grid.log"
step "adaptive sweep over the same grid"
timeout 3600 python3 -m zi_app -m hydra/sweeper=adaptive "${GRID[@]}" tracking.uri="$STORE" tracking.experiment=adaptive \
  hydra.sweep.dir="$DIR/adaptive" 2>&1 | tee "$DIR/adaptive.log"

step "comparison"
python3 - "$STORE" "$MODEL" "$BUDGET" "${GRID[*]}" <<'EOF' | tee "$DIR/comparison.md"
import sys

from mlflow.tracking import MlflowClient

from zi_app.record import results as sweep, runs, store, sweep_end

uri, model, budget, grid = sys.argv[1:]
client = MlflowClient(uri)


def summary(experiment: str) -> dict:
    """The sweep's jobs and best run, read from its parent run (the sweep callback's tags,
    zi_app/record/sweep_end.py) and its child runs: ``launched`` counts the jobs that started a process, not the ones the planner refused."""
    found = client.get_experiment_by_name(experiment)
    parents = [run for run in store.search_runs(client, [found.experiment_id], "")
               if run.data.tags.get(runs.ROLE_TAG) == "sweep"] if found else []
    if not parents:
        return {"jobs": 0, "launched": 0, "failed": 0, "best": None, "point": "(no sweep ran)"}
    tags, metrics = parents[0].data.tags, parents[0].data.metrics
    rows = sweep.child_rows(client, parents[0].info.run_id)
    launched = [row for row in rows if row.failure_kind != "invalid-config"]
    swept = [item for item in tags.get(sweep_end.BEST_OVERRIDES_TAG, "").split() if item.split("=")[0] in ("batch", "pin")]
    return {"jobs": len(rows), "launched": len(launched), "failed": sum(not row.completed for row in launched),
            "best": metrics.get(f"best_{sweep.METRIC}"), "point": " ".join(swept) or "(none)"}


grid_run, adaptive = summary("grid"), summary("adaptive")
print(f"## Adaptive sweep against the full grid: {model} under {budget} GiB\n\nGrid: `{grid}`\n")
print("| sweep | runs recorded | jobs launched | failed | best tokens/s | best point |\n|---|---|---|---|---|---|")
for name, row in (("full grid", grid_run), ("adaptive", adaptive)):
    best = "n/a" if row["best"] is None else f"{row['best']:.2f}"
    print(f"| {name} | {row['jobs']} | {row['launched']} | {row['failed']} | {best} | `{row['point']}` |")
print("\nruns recorded: the sweep's child runs, the planner's refusals (FAILED invalid-config, no process) included; "
      "jobs launched: the ones that started a process and loaded the model, the cost the goal counts.")
if grid_run["best"] and adaptive["best"] is not None and grid_run["launched"]:
    speed, jobs = adaptive["best"] / grid_run["best"], adaptive["launched"] / grid_run["launched"]
    met = speed >= 0.95 and jobs <= 0.5
    print(f"\nadaptive / grid: best tokens/s {speed:.3f}, jobs launched {jobs:.2f} "
          f"(goal: >= 0.95 with <= 0.50: {'met' if met else 'NOT met'})")
else:
    print("\nno ratio: a sweep has no completed job (see grid.log and adaptive.log)")
EOF
step "done"
