"""Progress of long work as the user sees it: the real app on a tiny model, its output piped (plain lines,
rate-limited) or on a real pseudo-terminal (tqdm bars), and the process_per_job launcher's planned sweep
time and time left in real multiruns."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT_S, app_env

from zi_app import validate
from zi_app.plan.job import plan_job
from zi_app.plan.speed import Prediction, predicted_job_s
from zi_app.run.progress import INTERVAL_S, human_seconds, progress, roofline_text

QUICK = ["prompt_len=8", "gen_len=4"]
# The H200 preset's rates: the planner predicts speed, and so a job's time, on a machine without a GPU.
RATES = ["hardware.h2d_pinned_gbps=55.2", "hardware.h2d_pageable_gbps=17.6", "hardware.gpu_memory_gbps=4800",
         "hardware.gpu_tflops=989"]
FINAL = re.compile(r"\[zi_app\.run\.progress\]\[INFO\] - (?P<label>[^:\n]+): (?P<done>\S+)/(?P<total>\S+)"
                   r"(?P<unit> \w+)? in (?P<seconds>[\d.]+) s$", re.M)
ON_THE_WAY = re.compile(r"\[zi_app\.run\.progress\]\[INFO\] - (?P<label>[^:\n]+): \S+/\S+.*, \d+ s(, about .* left)?$",
                        re.M)


def test_piped_output_gets_rate_limited_plain_lines(run_app, tiny_checkpoint):
    """Loading a checkpoint (partitioning, then weights) and every generate's decode steps: one final line
    each, done = total, and no more lines on the way than one per INTERVAL_S; no bar."""
    result = run_app("model=pretrained", f"model.path={tiny_checkpoint('tiny-opt')}", "model.dtype=float32",
                     *QUICK, "warmup=1", "repeat=2").expect_success()

    finals = defaultdict(list)
    for line in FINAL.finditer(result.stdout):
        finals[line["label"]].append(line)
    assert sorted(finals) == sorted(["partitioning under ZeRO-3", "loading weights", "warm-up 1/1", "repeat 1/2",
                                     "repeat 2/2"]), result.tail()
    for label, (line, *more) in finals.items():
        assert not more, f"{label}: more than one final line"
        assert line["done"] == line["total"], line.group(0)
        on_the_way = [other for other in ON_THE_WAY.finditer(result.stdout) if other["label"] == label]
        assert len(on_the_way) <= float(line["seconds"]) / INTERVAL_S, (label, on_the_way)
    assert finals["partitioning under ZeRO-3"][0]["total"].endswith("B")  # bytes, scaled (kB, MB, GB)
    assert finals["loading weights"][0]["total"].endswith("B")
    assert [finals[label][0]["total"] + finals[label][0]["unit"] for label in ("warm-up 1/1", "repeat 2/2")] == [
        "2 steps", "4 steps"]
    assert "\r" not in result.output and "it/s" not in result.output, "a progress bar in piped output"


@pytest.mark.quick
def test_only_rank_0_shows_progress(monkeypatch, caplog):
    """A job spanning several processes (one rank each) shows its progress once, from rank 0."""
    caplog.set_level(logging.INFO, logger="zi_app.run.progress")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with progress("repeat 1/1", 4, unit="step") as steps:
            for _ in range(4):
                steps.update()
    assert [record.getMessage().rsplit(" in ", 1)[0] for record in caplog.records] == ["repeat 1/1: 4/4 steps"]


def run_in_terminal(args, cwd: Path) -> tuple:
    """``python <args>`` in ``cwd`` with its stdout and stderr on a new 120-column pseudo-terminal, as in an
    interactive shell; returns (exit status, everything it wrote there)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=app_env(cwd), stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower)
    os.close(follower)
    output, deadline = [], time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the process closed its end
                    break
                if not chunk:
                    break
                output.append(chunk)
        return process.wait(timeout=60), b"".join(output).decode(errors="replace")
    finally:
        process.kill()
        os.close(leader)


def test_a_terminal_gets_tqdm_bars(tmp_path):
    status, output = run_in_terminal(["-m", "zi_app", *QUICK, "warmup=0", "repeat=1"], tmp_path)

    assert status == 0, output[-4000:]
    bytes_bar = r"partitioning under ZeRO-3: 100%\|█+\| [\d.]+[kMG]?/[\d.]+[kMG]? \[.*B/s\]"  # 3.69M/3.69M
    assert re.search(bytes_bar, output), output[-4000:]
    assert re.search(r"repeat 1/1: 100%\|█+\| 4/4 \[", output), output[-4000:]
    assert "\r" in output  # a bar redraws its line
    assert "[zi_app.progress]" not in output, "plain lines on a terminal"


@pytest.mark.quick
def test_a_jobs_planned_time_is_its_overhead_its_load_and_its_generates():
    """60 GB at 1.2 GB/s, 30 s of process start and engine, one warm-up of two tokens and three timed
    generates of 32 (each a prefill and a decode step per further token); no time without a speed."""
    timed = Prediction(peak_gpu_bytes=0, peak_host_bytes=0, streamed_bytes_per_step=0, nvme_bytes=0,
                       decode_step_s=0.5, prefill_s=2.0, tokens_per_sec=1.0)
    assert predicted_job_s(timed, 60 * 10**9, warmup=1, repeat=3, gen_len=32) == 30 + 50 + 2.5 + 3 * 17.5
    untimed = Prediction(0, 0, 0, 0, decode_step_s=None, prefill_s=None, tokens_per_sec=None)
    assert predicted_job_s(untimed, 60 * 10**9, warmup=1, repeat=3, gen_len=32) is None
    assert [human_seconds(s) for s in (45, 720, 7500)] == ["45 s", "12 min", "2 h 05 min"]


def planned_seconds(compose, *overrides: str) -> float:
    """The planner's predicted wall seconds of one job of the app with ``overrides``."""
    seconds = plan_job(validate(compose(*overrides)), cuda=False).predicted_job_s
    assert seconds is not None
    return seconds


def test_sweep_prints_its_planned_time_and_the_time_left(run_app, compose):
    jobs = [[*QUICK, "warmup=0", "repeat=1", *RATES, f"batch={batch}"] for batch in (1, 2)]
    planned = [planned_seconds(compose, *job) for job in jobs]
    result = run_app(*QUICK, "warmup=0", "repeat=1", *RATES, "batch=1,2", multirun=True).expect_success()

    assert f"\nsweep: 2 jobs to run, about {human_seconds(sum(planned))} (planned)\n" in result.stdout, result.tail()
    first = re.search(r"^\[1/2\] #0 .*batch=1: COMPLETED .* · about (.+) left$", result.stdout, re.M)
    assert first and first.group(1) == human_seconds(planned[1]), result.tail()
    assert re.search(r"^\[2/2\] #1 .*batch=2: COMPLETED [^·]*$", result.stdout, re.M), "nothing left, no time left"


@pytest.mark.quick
def test_the_roofline_is_said_only_where_something_crossed_the_link():
    """A decode step that streamed nothing (every weight and the cache on the GPU) has no roofline ratio to print:
    the line says so instead of "nanx"; one that streamed says its ratio, bytes and rate."""
    resident = roofline_text({"streamed_bytes_per_step": 0.0, "h2d_gbps": 55.1, "roofline_ratio": float("nan")})
    assert resident == "no roofline: nothing crossed the link in a decode step (0.00 GB/step at 55.1 GB/s)"
    streamed = roofline_text({"streamed_bytes_per_step": 4.757e9, "h2d_gbps": 55.1, "roofline_ratio": 2.336})
    assert streamed == "2.34x the roofline (4.76 GB/step at 55.1 GB/s)"
