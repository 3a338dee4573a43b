"""Host work of a decode step, measured where no GPU is: named variants of the app on a deep, narrow model whose
compute is negligible, so that a decode step's time is the host's walk through ZeRO-3's hooks, the fetch path and
the layers' Python. Each round runs every variant once (one process each, interleaved, so that a busy machine
slows all alike); the table gives each variant's median decode step over the rounds and its time per layer.

On a GPU the same host work runs beside the copies and bounds the step where it exceeds them
(docs/results/opt13b_int4_step_2026-12-07.md); this machine's CPU is not the GPU host's, so compare variants
measured together, not these times with a GPU's.

    python benchmarks/host_overhead.py --rounds 5 --common model=tiny-opt model.arch.num_hidden_layers=40 \\
        --variant deepspeed memory.fetch=deepspeed --variant overlap memory.fetch=overlap

``--checkout NAME=DIR`` runs that variant's jobs from another checkout of this repository (e.g. a ``git worktree`` of
an earlier commit), to compare a change with what came before it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from mlflow.tracking import MlflowClient

# One prompt token a step, every weight streamed: the step is the host's walk, not arithmetic.
WORKLOAD = ("batch=1", "prompt_len=8", "gen_len=32", "warmup=1", "repeat=1", "memory=tuned", "memory.persistence=0")


def step_seconds(cwd: Path, overrides: List[str], store: str) -> float:
    """The decode step of one job of the app, run from ``cwd`` into ``store``."""
    command = [sys.executable, "-m", "zi_app", *WORKLOAD, *overrides, f"tracking.uri={store}",
               "tracking.experiment=host-overhead"]
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(cwd)})
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("host-overhead")
    [latest] = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return latest.data.metrics["decode_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--common", nargs="*", default=[], help="overrides every variant shares")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"))
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR",
                        help="run variant NAME from the checkout DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, required=True, help="the model's decoder layers (for time a layer)")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    checkouts = dict(item.split("=", 1) for item in args.checkout)
    steps: Dict[str, List[float]] = {name: [] for name, *_ in args.variant}
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/host.db"
        for round_ in range(args.rounds):
            for name, *overrides in args.variant:
                cwd = Path(checkouts.get(name, here)).resolve()
                steps[name].append(step_seconds(cwd, [*args.common, *overrides], store))
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1] * 1e3:.1f} ms" for n, s in steps.items()),
                  flush=True)
    first = statistics.median(steps[args.variant[0][0]])
    print("\n| variant | decode step ms (median of rounds) | min-max ms | ms a layer | x first |")
    print("|---|---|---|---|---|")
    for name, values in steps.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} | "
              f"{median * 1e3 / args.layers:.2f} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
