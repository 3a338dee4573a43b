"""DeepSpeed's published ZeRO-Inference table on the lent GPU (issue 21 items 2 and 5): each cell (weights int4 or
fp16, the KV cache on the GPU or offloaded, one model) is one adaptive sweep over batch under the A6000's memory
(``memory.gpu_budget_gib=48``, prompt 512, 32 new tokens, ``memory=tuned``; the best's neighbours and every point
predicted faster than it measured), then DeepSpeed's own settings
(``memory=reference``) at the batch that won, all in one MLflow store, one experiment per cell (the sweep's parent
run holds its table and plot; ``zi-best --experiment seed-<cell>`` names the winner). A cell the plan refuses
(host memory, disk for NVMe) is recorded as refused before anything loads. Then the table, the published A6000
values beside ours.

    python benchmarks/seed_table.py run --store sqlite:////tmp/seed/mlflow.db int4:cpu:opt-66b int4:gpu:opt-66b
    python benchmarks/seed_table.py table --store sqlite:////tmp/seed/mlflow.db [--store ...] [--out FILE]

A cell is WEIGHTS:KV:MODEL, WEIGHTS int4 or fp16, KV gpu or cpu, MODEL one of the table's (``run`` without cells runs
every cell, in the issue's order of value). The KV-offload cells sweep ``kvcache.quant=none,int4`` too: the
published runs kept the cache at fp16, FlexGen's compressed it. ``table`` reads one store per device session: a
cell's row is its best job over them all, with DeepSpeed's settings from that job's session and the day it ran.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from typing import List, Optional, Tuple

from planner_vs_seed_table import PUBLISHED

from zi_app.record import results

# float16 for every model, as DeepSpeed's published runs (run_model.py); BLOOM-176B's own config is bfloat16.
SWEEP = ("model.dtype=float16", "memory=tuned", "memory.gpu_budget_gib=48", "prompt_len=512", "gen_len=32",
         "warmup=1", "repeat=1", "pin=true")
# to 384: OPT-30B fp16's offloaded best was 256, the largest of the grid then, and the plan puts 320 higher and in
# the host (2026-12-07)
BATCHES = "1,2,4,8,12,16,24,32,48,64,96,128,192,256,320,384"
ORDER = ("opt-66b", "opt-175b", "opt-30b", "llama-2-70b", "bloom-176b")  # the order of value
NVME_PATH = "/tmp/zi-nvme"


def cells() -> List[str]:
    """Every cell of the published table, int4 with KV offload first, then by model in ORDER."""
    keys = sorted(PUBLISHED, key=lambda key: (key != ("int4", "cpu"), key))
    return [f"{'fp16' if quant == 'none' else quant}:{kv}:{model}" for quant, kv in keys for model in ORDER]


def parse(cell: str) -> Tuple[str, str, str]:
    """(quant, kvcache, model) of a cell, or SystemExit naming what is allowed."""
    parts = cell.split(":")
    allowed = ", ".join(cells())
    if len(parts) != 3:
        sys.exit(f"cell {cell!r}: WEIGHTS:KV:MODEL, one of {allowed}")
    weights, kv, model = parts
    quant = "none" if weights == "fp16" else weights
    if model not in PUBLISHED.get((quant, kv), {}):
        sys.exit(f"cell {cell!r} is not in the published table: one of {allowed}")
    return quant, kv, model


def experiment(cell: str) -> str:
    return "seed-" + cell.replace(":", "-")


def cell_overrides(cell: str) -> List[str]:
    """The overrides every job of a cell shares (its model, weights, KV cache and where the weights live)."""
    quant, kv, model = parse(cell)
    offload = PUBLISHED[(quant, kv)][model][2]
    nvme = ["offload=nvme", f"offload.nvme_path={NVME_PATH}"] if offload == "nvme" else []
    return [f"model={model}", f"quant={quant}", f"kvcache={kv}", *nvme, *SWEEP]


def app(store: str, cell: str, overrides: List[str], multirun: bool) -> None:
    """Run the app (``-m``: a sweep) into the cell's experiment; its output goes to ours."""
    command = [sys.executable, "-m", "zi_app", *(["-m"] if multirun else []), *overrides,
               f"tracking.uri={store}", f"tracking.experiment={experiment(cell)}"]
    print(f"=== {time.strftime('%H:%M:%S')} {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=False)


def cell_rows(client, cell: str) -> Optional[List[results.JobRow]]:
    """Every job the cell's experiment holds, or None where it has none (the cell was not run)."""
    found = client.get_experiment_by_name(experiment(cell))
    return None if found is None else results.experiment_rows(client, [found.experiment_id])


def winner(rows: List[results.JobRow]) -> Optional[results.JobRow]:
    """The fastest finished job with our settings, or None."""
    return results.best([row for row in rows if row.values().get("memory") != "reference"])


def run(store: str, chosen: List[str]) -> None:
    """Each cell's sweep, then DeepSpeed's settings at the batch that won."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    # The directory NVMe offload would swap into exists, so the plan measures its free disk against the need.
    os.makedirs(NVME_PATH, exist_ok=True)
    for cell in chosen:
        common = cell_overrides(cell)
        # An offloaded cache keeps what the budget holds of it on the GPU (kvcache.gpu_layers=auto).
        swept = [f"batch={BATCHES}"] + (["kvcache.quant=none,int4", "kvcache.gpu_layers=auto"]
                                        if parse(cell)[1] == "cpu" else [])
        # The planner can misplace a cell's peak (docs/results/seed_table_2026-12-06.md): points it predicts faster
        # than the measured best are measured too.
        app(store, cell, ["hydra/sweeper=adaptive", "hydra.sweeper.measure_predicted_faster=true", *common, *swept],
            multirun=True)
        top = winner(cell_rows(client, cell) or [])
        if top is None:
            print(f"=== {cell}: no job finished; DeepSpeed's settings not run", flush=True)
            continue
        batch = top.values()["batch"]
        reference = [o for o in common if o != "memory=tuned"] + ["memory=reference", f"batch={batch}"]
        app(store, cell, reference, multirun=False)


def row(clients: List, cell: str) -> List[str]:
    """The table's row of a cell, its best over every store: published, ours (batch, roofline ratio, peaks),
    DeepSpeed's at our batch in the same store (session), the day it was measured."""
    quant, kv, model = parse(cell)
    published, published_batch, _ = PUBLISHED[(quant, kv)][model]
    head = [model, "int4" if quant == "int4" else "fp16", kv, f"{published:.2f} (bsz {published_batch})"]
    sessions = [found for found in (cell_rows(client, cell) for client in clients) if found is not None]
    won = [(winner(found), found) for found in sessions]
    top, rows = max(((best, found) for best, found in won if best), key=lambda pair: pair[0].metrics[results.METRIC],
                    default=(None, None))
    if top is None:
        return head + [outcomes(sum(sessions, [])) if sessions else "not run"] + [""] * 5
    ours, values = top.metrics, top.values()
    speed = ours[results.METRIC]
    reference = reference_at(rows, values["batch"])
    theirs = (f"{reference.metrics[results.METRIC]:.2f}" if reference and reference.completed
              else refusal(reference) if reference else other_session(sessions, values["batch"]))
    width = f", KV {values['kvcache.quant']}" if "kvcache.quant" in values else ""
    peaks = [ours.get(key, 0) / results.GIB for key in (results.GPU_ALLOCATED, results.HOST_RSS)]
    ratio = ours.get("roofline_ratio", math.nan)
    # A step that streams no weight (all resident under the budget) has no PCIe roofline to be measured against.
    roofline = "no weight streamed" if math.isnan(ratio) else f"{ratio:.2f}"
    day = time.strftime("%Y-%m-%d", time.gmtime(top.start_time / 1000))
    return head + [f"{speed:.2f} (bsz {values['batch']}{width})", f"{speed / published:.2f}", roofline,
                   f"{peaks[0]:.1f} / {peaks[1]:.1f}", theirs, day]


def reference_at(rows: List[results.JobRow], batch) -> Optional[results.JobRow]:
    """DeepSpeed's settings at ``batch`` among one session's ``rows``: the finished job, else the first, else None."""
    found = [r for r in rows if r.values().get("memory") == "reference" and r.values().get("batch") == batch]
    return next((r for r in found if r.completed), found[0] if found else None)


def other_session(sessions: List[List[results.JobRow]], batch) -> str:
    """Where the winning session did not run DeepSpeed's settings at ``batch``: a session that ran both at that
    batch, its pair named (the two measured side by side), else "not run"."""
    for rows in sessions:
        reference, ours = reference_at(rows, batch), winner([r for r in rows if r.values().get("batch") == batch])
        if reference is not None and reference.completed and ours is not None:
            day = time.strftime("%Y-%m-%d", time.gmtime(reference.start_time / 1000))
            return (f"{reference.metrics[results.METRIC]:.2f} (ours {ours.metrics[results.METRIC]:.2f} beside it "
                    f"on {day})")
    return "not run"


def outcomes(rows: List[results.JobRow]) -> str:
    """A cell none of whose jobs finished: why, once per distinct reason (a refusal names its host memory)."""
    return "no job finished: " + "; ".join(dict.fromkeys(refusal(job) for job in rows))


REFUSALS = (  # the plan's refusals a table cell names, by their numbers
    (r"host RSS ([\d.]+) GiB .* exceeds the ([\d.]+) GiB", "host {} GiB predicted, {} GiB here"),
    (r"swapped weights: ([\d.]+) GiB needed, ([\d.]+) GiB free", "NVMe {} GiB needed, {} GiB free"),
    (r"(libaio) is missing", "no {} for NVMe"),
)


def refusal(job: results.JobRow) -> str:
    """A job that did not finish, in a table cell: the plan's refusals by their numbers, else its outcome."""
    found = [text.format(*match.groups()) for pattern, text in REFUSALS
             for match in [re.search(pattern, job.failure_message)] if match]
    if job.failure_kind == "invalid-config" and found:
        return "refused by the plan: " + ", ".join(found)
    return job.outcome()


def table(stores: List[str]) -> str:
    """The published table with our row beside each cell, its best over ``stores`` (one per device session)."""
    from mlflow.tracking import MlflowClient

    clients = [MlflowClient(store) for store in stores]
    header = ["model", "weights", "KV cache", "published A6000 tokens/s", "ours tokens/s (batch)", "ours / published",
              "step / roofline", "peak GPU / host GiB", "DeepSpeed's settings at our batch", "measured"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row(clients, cell)) + " |" for cell in cells()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("run", "table"))
    parser.add_argument("cells", nargs="*", help="WEIGHTS:KV:MODEL (run: default every cell)")
    parser.add_argument("--store", required=True, action="append",
                        help="the MLflow store (sqlite:///... or a server); table: one per session, repeated")
    parser.add_argument("--out", help="table: also write it here (Markdown)")
    args = parser.parse_intermixed_args()
    if args.mode == "run":
        chosen = args.cells or cells()
        for cell in chosen:
            parse(cell)  # every cell checked before the first sweep starts
        if len(args.store) > 1:
            sys.exit("run: one --store (the sweeps' store)")
        run(args.store[0], chosen)
        return
    text = table(args.store)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
