"""Print how a job scales with the GPUs it spans, from benchmarks/compare.py results whose variants set
``devices``: for each setting (a variant's overrides other than ``devices``), against the same setting on the
fewest GPUs measured. Two ratios, because ``batch`` is per rank: the job's tokens/s (its batch grows with N
too), and the decode step's speed-up, whose ideal is N x: a step is bound by the weight bytes streamed, and N
ranks stream 1/N of them each over N PCIe links. The planner's prediction logged by the same run is beside it.

    python benchmarks/scaling.py docs/results/opt30b_multi_gpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def settings(results: list) -> dict:
    """{setting: [(devices, result)]} of the finished runs, fewest devices first."""
    grouped = defaultdict(list)
    for result in results:
        if result["status"] != "FINISHED":
            continue
        rest = [o for o in result["overrides"] if not o.startswith("devices=")]
        devices = next((int(o.split("=", 1)[1]) for o in result["overrides"] if o.startswith("devices=")), 1)
        grouped[" ".join(rest)].append((devices, result))
    return {key: sorted(runs, key=lambda run: run[0]) for key, runs in grouped.items()}


def table(results: list) -> str:
    """The scaling table in Markdown; each setting's fewest-GPU run is its own base (ratios 1.00)."""
    lines = ["| setting | GPUs | tokens/s | predicted tokens/s | tokens/s x fewest GPUs | decode step s "
             "| step speed-up | ideal (links) | of ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for setting, runs in settings(results).items():
        base_devices, base = runs[0]
        for devices, result in runs:
            metrics = result["metrics"]
            predicted = metrics.get("predicted_tokens_per_sec")
            speedup = base["metrics"]["decode_step_s"] / metrics["decode_step_s"]
            ideal = devices / base_devices
            lines.append(f"| `{setting}` | {devices} | {metrics['tokens_per_sec']:.2f} | "
                         f"{'n/a' if predicted is None else f'{predicted:.2f}'} | "
                         f"{metrics['tokens_per_sec'] / base['metrics']['tokens_per_sec']:.2f} | "
                         f"{metrics['decode_step_s']:.3f} | {speedup:.2f} | {ideal:.0f} | {speedup / ideal:.0%} |")
    return "\n".join(lines)


def main(paths: list) -> None:
    if not paths:
        sys.exit("usage: scaling.py RESULTS.json [RESULTS.json ...] (benchmarks/compare.py's --out .json files)")
    for path in paths:
        data = json.loads(Path(path).read_text())
        print(f"## {data['title']}\n\n{data['machine']}\n\n{table(data['results'])}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
