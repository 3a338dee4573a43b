"""Print docs/planner.md's accuracy table: every finished run committed under docs/results/ (the runs
tests/plan/test_planner.py holds the planner to, read with its own reader), planned for hardware=h200 at the link
rate it measured, predicted against measured.

    .venv/bin/python benchmarks/planner_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "plan"), str(ROOT / "tests")]
from test_planner import RUNS, predicted_for_run, warm  # noqa: E402  (the test's own reader and prediction)

GIB = 2**30
SHOWN_AS_COMMON = ("warmup=", "repeat=", "profile_step", "tracking.")


def row(name: str, overrides: list, measured: dict) -> str:
    """One table row: peak GPU, peak host, streamed bytes, decode step and tokens/s, predicted / measured."""
    plan, peak, host, streamed, step_s, speed = predicted_for_run(name, overrides, measured,
                                                                  lambda *chosen: compose("config", list(chosen)))
    def pair(pred: float, meas: float, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        error = f" ({pred / meas - 1:+.1%})" if meas else ""
        return f"{fmt.format(pred / scale)} / {fmt.format(meas / scale)}{error}"

    shown = " ".join(o for o in overrides if not o.startswith(SHOWN_AS_COMMON))
    cold = "" if warm(plan) else " (cold: warmup=0)"
    return (f"| {name} | {shown} | {pair(peak, measured['peak_gpu_allocated_bytes'], GIB)} "
            f"| {pair(host, measured['peak_host_rss_bytes'], GIB)} "
            f"| {pair(streamed, measured['streamed_bytes_per_step'], 1e9)} "
            f"| {pair(step_s, measured['decode_step_s'], fmt='{:.3f}')} "
            f"| {pair(speed, measured['tokens_per_sec'], fmt='{:.1f}')}{cold} |")


def main() -> None:
    print("| run | overrides (beyond warmup/repeat) | peak GPU GiB | peak host GiB | streamed GB/step | decode step s "
          "| tokens/s |\n|---|---|---|---|---|---|---|")
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        for name, overrides, measured in RUNS:
            print(row(name, overrides, measured), flush=True)


if __name__ == "__main__":
    main()
