"""Where a profiled decode step's link sits idle: read a job's ``profile/decode_step_timeline.json.gz``
(``profile_step=true`` on CUDA: the step's copies, kernels and CUDA runtime calls at real timing) and print
the host-to-device copies' busy time against the step, then the copy queue's idle gaps, longest first, each
with what the GPU's kernels and the host's CUDA calls were doing meanwhile.

A decode step that streams its weights is bound by the link when the copies never stop; every gap here is
time the step pays on top of its roofline, and what ran in the gap says who held the next copy back (a
kernel the copy waits for, a host synchronisation, or nothing: the host had not issued it yet).

    python benchmarks/step_timeline.py RUN_ARTIFACTS/profile/decode_step_timeline.json.gz [--gaps 12]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from typing import Dict, List, Tuple

from zi_app.run.measure import busy_spans

Interval = Tuple[float, float]


def load(path: str) -> List[dict]:
    """The trace's complete events (microsecond ``ts`` and ``dur``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X"]


def span(event: dict) -> Interval:
    return event["ts"], event["ts"] + event.get("dur", 0)


def overlap(a: Interval, b: Interval) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def busy(intervals: List[Interval]) -> float:
    return sum(stop - start for start, stop in intervals)


def gaps(intervals: List[Interval], within: Interval) -> List[Interval]:
    """The idle intervals of disjoint ``intervals`` inside ``within``, the step's edges included."""
    out, cursor = [], within[0]
    for start, stop in intervals:
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, stop)
    if within[1] > cursor:
        out.append((cursor, within[1]))
    return out


def during(events: List[dict], gap: Interval, top: int = 3) -> str:
    """The events overlapping ``gap``, by name, the most time first: ``name x count (us)``."""
    time: Dict[str, float] = collections.Counter()
    count: Dict[str, int] = collections.Counter()
    for event in events:
        shared = overlap(span(event), gap)
        if shared > 0:
            name = event["name"][:48]
            time[name] += shared
            count[name] += 1
    return "; ".join(f"{name} x{count[name]} ({us:.0f} us)" for name, us in time.most_common(top)) or "-"


def report(events: List[dict], shown: int) -> str:
    """The step's copy-queue summary and its ``shown`` longest gaps as a Markdown table."""
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    gpu = [span(e) for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset", "kernel")]
    step = (min(s for s, _ in gpu), max(e for _, e in gpu))
    copy_busy = busy_spans(copies)
    idle = sorted(gaps(copy_busy, step), key=lambda g: g[0] - g[1])
    moved = sum(int(e.get("args", {}).get("bytes", 0)) for e in copies)
    length = step[1] - step[0]
    lines = [
        f"GPU span of the step: {length / 1e3:.2f} ms; host-to-device copies: {len(copies)}, {moved / 1e9:.3f} GB, "
        f"busy {busy(copy_busy) / 1e3:.2f} ms ({moved / busy(copy_busy) / 1e3:.1f} GB/s while busy)",
        f"kernels: {len(kernels)}, busy {busy(busy_spans(kernels)) / 1e3:.2f} ms; copy queue idle "
        f"{busy(idle) / 1e3:.2f} ms in {len(idle)} gaps ({sum(1 for g in idle if g[1] - g[0] >= 50)} of 50 us or more)",
        "",
        "| gap at ms | length us | kernels running | host CUDA calls |",
        "|---|---|---|---|",
    ]
    for gap in idle[:shown]:
        lines.append(f"| {(gap[0] - step[0]) / 1e3:.2f} | {gap[1] - gap[0]:.0f} | {during(kernels, gap)} | "
                     f"{during(runtime, gap)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a decode_step_timeline.json.gz artifact")
    parser.add_argument("--gaps", type=int, default=12, help="how many of the longest gaps to list")
    args = parser.parse_args()
    print(report(load(args.trace), args.gaps))


if __name__ == "__main__":
    main()
