"""Turn the compare.py sections of a device session log into compare.py's results JSON, for runs whose MLflow
store was lost with the machine (it went back before the store was packed). Each variant's metrics are what
its ``result:`` line printed (tokens/s, decode step, prefill, peaks, streamed bytes, link rate), at that
line's precision; the JSON says so in its ``source``.

    python benchmarks/results_from_log.py docs/results/planner_accuracy_session_2026-12-04.log "kvcache=cpu" \\
        docs/results/opt1-3b_kvcpu_b64_planner_accuracy_2026-12-04.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GIB = 2**30
STEP = re.compile(r"^=== \S+ (?P<title>.*)$")
VARIANT = re.compile(r"^== (?P<name>[^:]+): (?P<overrides>\S+=.*)$")
END = re.compile(r"^== (?P<name>[^:]+): (?P<status>FINISHED|FAILED)(?: \((?P<kind>\w+)\))?")
RESULT = re.compile(
    r"result: \S+ batch=(?P<batch>\d+) (?P<tps>[\d.]+) tokens/s \(predicted (?P<ptps>[\d.]+)\), decode step (?P<step>[\d.]+) s, "
    r"prefill (?P<prefill>[\d.]+) s, peak host (?P<host>[\d.]+) GiB, peak GPU (?P<gpu>[\d.]+) GiB "
    r"\(predicted (?P<pgpu>[\d.]+)\), .*\((?P<streamed>[\d.]+) GB/step at (?P<gbps>[\d.]+) GB/s\)")


def metrics_of(match: re.Match) -> dict:
    """The metrics a ``result:`` line states, under the names the app logs them with."""
    value = {key: float(text) for key, text in match.groupdict().items() if key != "batch"}
    return {"tokens_per_sec": value["tps"], "predicted_tokens_per_sec": value["ptps"],
            "decode_step_s": value["step"], "prefill_s": value["prefill"],
            "peak_host_rss_bytes": value["host"] * GIB, "peak_gpu_allocated_bytes": value["gpu"] * GIB,
            "predicted_peak_gpu_bytes": value["pgpu"] * GIB, "streamed_bytes_per_step": value["streamed"] * 1e9,
            "h2d_gbps": value["gbps"], "h2d_pinned_gbps": value["gbps"]}


def section(lines: list, title_part: str) -> dict:
    """The results of the first compare.py section whose ``===`` title contains ``title_part``. A job whose
    compare.py was stopped (its step's ``timeout``) while the job itself went on is FINISHED by its
    ``result:`` line (printed only by a finished job), the next one of its batch further down the log."""
    title, results, current, inside = None, [], None, False
    for index, line in enumerate(lines):
        step = STEP.match(line)
        if step and not inside and title_part in step.group("title"):
            title, inside = step.group("title"), True
            continue
        if not inside:
            continue
        if step and current is None:
            break
        if (variant := VARIANT.match(line)) and not END.match(line):
            if current is not None:
                batch = next((o.split("=")[1] for o in current["overrides"] if o.startswith("batch=")), None)
                late = next((m for later in lines[index:] if (m := RESULT.search(later)) and m["batch"] == batch), None)
                if late:
                    results.append({**current, "metrics": metrics_of(late), "status": "FINISHED",
                                    "failure": "its compare.py was stopped by the step's timeout; the job finished"})
                break
            current = {"name": variant.group("name"), "overrides": variant.group("overrides").split(),
                       "status": None, "failure": "", "metrics": {}}
        elif current and (result := RESULT.search(line)):
            current.update(metrics=metrics_of(result), status="FINISHED")
            results.append(current)
            current = None
        elif current and (end := END.match(line)):
            current.update(status=end.group("status"), failure=end.group("kind") or "")
            results.append(current)
            current = None
    return {"title": title, "results": results}


def main(argv: list) -> None:
    log, title_part, out = Path(argv[0]), argv[1], Path(argv[2])
    found = section(log.read_text().splitlines(), title_part)
    if not found["results"]:
        raise SystemExit(f"no compare.py section titled with {title_part!r} in {log}")
    found.update(machine="NVIDIA H200 (the device library's nvidia-h200), torch 2.11.0, deepspeed 0.19.8, "
                         "transformers 5.17.0, Python 3.12.3",
                 source=f"transcribed by benchmarks/results_from_log.py from {log.name}: the result lines' precision")
    out.write_text(json.dumps(found, indent=2) + "\n")
    print(f"{out}: {len(found['results'])} runs of {found['title']!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
