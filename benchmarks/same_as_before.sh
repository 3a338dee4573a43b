#!/usr/bin/env bash
# Runs the same small GPU jobs with an earlier tree of the app and with this checkout, one after the other on
# one machine, and prints whether each pair generated the same tokens, with both runs' tokens/s and peaks: a
# refactor's check that behaviour on CUDA (fetch path, offloaded KV cache, init-time int4, no offload) did
# not change. The earlier tree is made here and carried (it is git-ignored):
#   mkdir -p .old && git archive <rev> zi_app hydra_plugins conf | tar -x -C .old
# then, on the device, from the checkout:  bash benchmarks/on_device.sh bash benchmarks/same_as_before.sh .old "$OUT"
# Each job's MLflow store and output folder are under /tmp, never in the tree a later call re-sends.
set -uo pipefail
OLD=$(cd "$1" && pwd); OUT=${2:-/tmp/same_as_before}
NEW=$PWD
mkdir -p "$OUT"
COMMON="model=opt-1.3b batch=8 prompt_len=128 gen_len=8 warmup=1 repeat=1"
JOBS=("memory=tuned" "memory=reference" "kvcache=cpu" "quant=int4" "offload=none")
for i in "${!JOBS[@]}"; do
  for tree in old new; do
    root=$([ "$tree" = old ] && echo "$OLD" || echo "$NEW")
    work=/tmp/same_as_before/$tree/$i
    mkdir -p "$work"
    echo "== job $i (${JOBS[$i]}), $tree tree"
    (cd "$work" && PYTHONPATH="/tmp/site:$root" python3 -m zi_app $COMMON ${JOBS[$i]} \
       tracking.uri=sqlite:///$work/mlruns/mlflow.db hydra.run.dir=$work/run 2>&1 | grep -E "result:|Error|error:") \
      | tee -a "$OUT/same_as_before.log"
  done
done
PYTHONPATH=/tmp/site python3 - "$OUT" "${JOBS[@]}" <<'EOF'
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient

out, jobs = Path(sys.argv[1]), sys.argv[2:]
rows = ["| job | same tokens | tokens/s old / new | peak GPU GiB old / new | peak host GiB old / new |",
        "|---|---|---|---|---|"]
for i, job in enumerate(jobs):
    runs = {}
    for tree in ("old", "new"):
        client = MlflowClient(f"sqlite:////tmp/same_as_before/{tree}/{i}/mlruns/mlflow.db")
        [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        path = client.download_artifacts(run.info.run_id, "generation.json", f"/tmp/same_as_before/{tree}/{i}")
        runs[tree] = (run.data.metrics, json.loads(Path(path).read_text())["generated_token_ids"])
    (old, old_ids), (new, new_ids) = runs["old"], runs["new"]
    pair = lambda key, scale=1: f"{old.get(key, float('nan')) / scale:.2f} / {new.get(key, float('nan')) / scale:.2f}"
    rows.append(f"| {job} | {'yes' if old_ids == new_ids else 'NO'} | {pair('tokens_per_sec')} | "
                f"{pair('peak_gpu_allocated_bytes', 2**30)} | {pair('peak_host_rss_bytes', 2**30)} |")
(out / "same_as_before.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
