"""Run named ZeRO-Inference variants side by side on one CUDA machine and print/write a comparison table.

Each variant is one job of ``python -m zi_app`` in its own process (clean peaks, no leaked pinned
memory), all in one MLflow experiment; ratios are against the first variant, measured in the same run.

    python benchmarks/compare.py --title "OPT-13B batch 32" --common model=opt-13b batch=32 \\
        --variant reference memory=reference --variant tuned memory=tuned --out docs/results/opt13b

``--plain-gpu NAME [OVERRIDE...]`` adds the same model loaded plainly onto the GPU (benchmarks/plain_gpu.py).

Writes ``<out>.md`` (table with command, machine and versions), ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

from zi_app.record import runs
from zi_app.config.schema import TrackingSpec

PLAIN_GPU = Path(__file__).with_name("plain_gpu.py")
COLUMNS = [  # (metric, header, scale, format)
    ("tokens_per_sec", "tokens/s", 1, "{:.2f}"),
    ("predicted_tokens_per_sec", "predicted tokens/s", 1, "{:.2f}"),
    ("decode_step_s", "decode step s", 1, "{:.3f}"),
    ("prefill_s", "prefill s", 1, "{:.2f}"),
    ("streamed_bytes_per_step", "streamed GB/step", 1e-9, "{:.2f}"),
    ("roofline_step_s", "roofline s", 1, "{:.3f}"),
    ("roofline_ratio", "step/roofline", 1, "{:.2f}"),
    ("peak_gpu_allocated_bytes", "peak GPU GiB", 2**-30, "{:.1f}"),
    ("predicted_peak_gpu_bytes", "predicted GPU GiB", 2**-30, "{:.1f}"),
    ("peak_host_rss_bytes", "peak host GiB", 2**-30, "{:.1f}"),
    ("predicted_peak_host_bytes", "predicted host GiB", 2**-30, "{:.1f}"),
    ("load_s", "load s", 1, "{:.0f}"),
]
PROFILE_COLUMNS = [  # one decode step under the Python tracer (profile_step=true); docs/metrics.md
    ("profile_step_s", "profiled step s", 1, "{:.3f}"),
    ("profile_zero3_fetches", "ZeRO-3 fetch hooks", 1, "{:.0f}"),
    ("profile_zero3_hook_s", "in hooks s", 1, "{:.3f}"),
    ("profile_host_sync_wait_s", "host sync waits s", 1, "{:.3f}"),
    ("profile_htod_busy_s", "H2D copy busy s", 1, "{:.3f}"),
    ("profile_kernel_busy_s", "kernels busy s", 1, "{:.3f}"),
    ("profile_dequant_kernel_s", "dequant kernels s", 1, "{:.3f}"),
    ("profile_gpu_idle_s", "GPU idle s", 1, "{:.3f}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--title", required=True)
    parser.add_argument("--common", nargs="*", default=[], help="overrides shared by every variant")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"),
                        help="a variant: its name, then its overrides")
    parser.add_argument("--plain-gpu", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                        help="a baseline after the variants: the model loaded with transformers onto the GPU, no "
                             "DeepSpeed (benchmarks/plain_gpu.py); its name, then its overrides")
    parser.add_argument("--out", required=True, help="path prefix of the .md/.json/.png results")
    parser.add_argument("--store", default=TrackingSpec.uri, help="MLflow tracking URI (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one variant may take")
    return parser.parse_args(argv)


def require_cuda() -> None:
    """Refuse to run without a CUDA GPU: every figure here is a GPU measurement."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/compare.py measures ZeRO-Inference on a CUDA GPU, and torch sees none here "
                 "(torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU.")


def run_variant(name: str, overrides: list, store: str, experiment: str, timeout: int, plain: bool = False) -> dict:
    """Run one variant as its own process (``plain``: the plain-GPU baseline) and return its MLflow metrics
    and status."""
    import mlflow

    run_dir = Path("outputs/bench") / experiment / name
    tracking_overrides = [f"tracking.uri={store}", f"tracking.experiment={experiment}"]
    if plain:
        command = [sys.executable, str(PLAIN_GPU), "--run-dir", str(run_dir), *overrides, *tracking_overrides]
    else:
        command = [sys.executable, "-m", "zi_app", *overrides, *tracking_overrides, f"hydra.run.dir={run_dir}"]
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    started = time.time()
    try:
        proc = subprocess.run(command, timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    metrics, status, reason, tokens = {}, f"exit {code}", "", None
    run_id_file = run_dir / runs.RUN_ID_FILE
    if run_id_file.is_file():
        mlflow.set_tracking_uri(store)
        run = mlflow.get_run(run_id_file.read_text().strip())
        metrics, status = dict(run.data.metrics), run.info.status
        reason = run.data.tags.get(runs.FAILURE_KIND_TAG, "")
        if status == "FINISHED" and not plain:
            tokens = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/generation.json")["generated_token_ids"]
    print(f"== {name}: {status} {reason} in {time.time() - started:.0f} s", flush=True)
    return {"name": name, "overrides": overrides, "status": status, "failure": reason, "metrics": metrics,
            "tokens": tokens}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "deepspeed", "transformers"))
    return f"{gpu}, {platform.node()}, {versions}, Python {platform.python_version()}"


def rows_equal(tokens: Optional[list], first: Optional[list]) -> str:
    """"yes" where a variant's greedy tokens are the first variant's, else how many of the rows both generated are
    ("19 of 56"): the prompts are seeded, so row i is the same prompt at any batch."""
    if tokens is None or first is None:
        return ""
    if tokens == first:
        return "yes"
    return f"{sum(mine == theirs for mine, theirs in zip(tokens, first))} of {min(len(tokens), len(first))} rows"


def table(results: list, columns: list = COLUMNS) -> str:
    """Markdown table of every variant, with tokens/s relative to the first variant and whether its greedy tokens
    are the first variant's (generation.json; row by row where the batches differ)."""
    header = ["variant", "status", *[c[1] for c in columns], "x first", "tokens = first"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results[0]["metrics"].get("tokens_per_sec")
    for row in results:
        m = row["metrics"]
        cells = [row["name"], row["status"] + (f" ({row['failure']})" if row["failure"] else "")]
        cells += [fmt.format(m[key] * scale) if key in m else "" for key, _, scale, fmt in columns]
        ratio = m.get("tokens_per_sec")
        cells.append(f"{ratio / base:.2f}" if ratio and base else "")
        cells.append(rows_equal(row.get("tokens"), results[0].get("tokens")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(title: str, command: str, results: list) -> str:
    """The Markdown section: command, machine, the main table, and the step profile where one was taken."""
    parts = [f"### {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", "", table(results), ""]
    if any("profile_step_s" in r["metrics"] for r in results):
        parts += ["Where one decode step's time goes (`profile_step=true`, Python tracer on):", "",
                  table(results, PROFILE_COLUMNS), ""]
    return "\n".join(parts)


def plot(results: list, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    values = [r["metrics"].get("tokens_per_sec", 0.0) for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 4))
    ax.bar(names, values, color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
    for x, value in enumerate(values):
        ax.text(x, value, f"{value:.1f}", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (batch x gen_len / generate wall time)")
    ax.set_title(title)
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_cuda()
    experiment = f"bench-{Path(args.out).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: a name such as opt1.3b_x has a "suffix" (.3b_x) to lose.
    written = {ext: out.parent / f"{out.name}.{ext}" for ext in ("md", "json", "png")}
    results = []
    variants = [(v, False) for v in args.variant] + [(v, True) for v in args.plain_gpu]
    for (name, *overrides), plain in variants:
        results.append(run_variant(name, [*args.common, *overrides], args.store, experiment, args.timeout, plain))
        # Written after every variant, so a run cut short still leaves what it measured.
        text = report(args.title, command, results)
        written["md"].write_text(text)
        written["json"].write_text(json.dumps(
            {"title": args.title, "machine": machine(), "command": command, "results": results}, indent=2))
    plot(results, args.title, written["png"])
    print(text)


if __name__ == "__main__":
    main()
