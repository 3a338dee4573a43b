"""A job of several devices (``devices`` > 1): one rank, a process, per device, started by torch elastic's
launcher from the job's process, and the job's metrics made from what its ranks return.

The job's process keeps the MLflow run; the ranks never touch MLflow. Each rank runs
:func:`zi_app.run.inference.run_inference` on its slice of the job's prompts and returns its metrics and token ids;
what a rank measures is passed on to the run as ``<name>.rank<r>`` as soon as it exists, so a failed job keeps
it. docs/metrics.md ("Jobs of several devices") says how the job's metrics are made from the ranks'.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from zi_app.config.schema import JobSpec
from zi_app.plan.facts import ModelFacts
from zi_app.run import interrupt, measure
from zi_app.run.failure import out_of_memory
from zi_app.run.inference import InferenceResult, run_inference

log = logging.getLogger(__name__)

MONITOR_S = 0.1  # how often elastic's agent looks at its ranks: a dead rank's peers are stopped this soon
RSS_SAMPLE_S = 0.2  # how often the job's process tree's memory is sampled
# The rendezvous's heartbeat period. Heartbeats tell other nodes this one lives; a job has one node, so none is
# needed. On a signal elastic leaves the rendezvous open (torch.distributed.launcher.api.launch_agent), so the
# heartbeat's daemon thread outlives the job: every 5 s (torch's default) it calls the store with the GIL released,
# and one that the interpreter's exit catches there aborts the process ("terminate called without an active
# exception", exit -6 instead of 128 + the signal). A week-long period keeps the thread asleep until the exit.
KEEP_ALIVE_S = 7 * 24 * 3600
# The job's link bandwidth is the sum of its ranks' (each rank streams its own shard over its own GPU's link).
# Every other measured metric is the worst rank's: streamed bytes per step are one rank's, as predicted.
SUMMED = ("h2d_pinned_gbps", "h2d_pageable_gbps", "h2d_gbps")
# Metrics made again from the job's totals rather than taken from a rank.
DERIVED = ("tokens_per_sec", "prefill_tokens_per_sec", "decode_tokens_per_sec", "roofline_step_s",
           "roofline_ratio", "peak_host_rss_bytes")


class RankFailed(Exception):
    """A rank of the job failed: names the rank, how its process ended (exit code or signal) and its error.

    ``failure_kind`` is ``killed`` for a rank a signal ended (the kernel's out-of-memory killer, a kill from
    outside), ``oom`` for an allocation that failed inside it, else ``error``.
    """

    def __init__(self, rank: int, exitcode: int, signal_name: Optional[str], error: str):
        self.rank, self.exitcode, self.rank_signal, self.error = rank, exitcode, signal_name, error
        self.failure_kind = "killed" if signal_name else "oom" if out_of_memory(error) else "error"
        ended = f"killed by {signal_name}" if signal_name else f"exit code {exitcode}"
        super().__init__(f"rank {rank} failed ({ended}): {error}")

    def __reduce__(self):
        return type(self), (self.rank, self.exitcode, self.rank_signal, self.error)


RANK_FILE = "rank{}.jsonl"  # what a rank measured, a JSON object a line; open in the rank while it runs


def _rank_file(scratch: str, rank: int) -> Path:
    return Path(scratch) / RANK_FILE.format(rank)


def _rank_main(spec: JobSpec, ds_config: Dict[str, Any], facts: ModelFacts, scratch: str) -> Dict[str, Any]:
    """One rank, in its own process: the environment elastic set names it (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, which DeepSpeed's process group reads); returns what it measured and generated."""
    import torch

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    # Ctrl-C reaches a rank twice (the terminal's process group, then elastic stopping its ranks): handled as a
    # job of one device handles it, the repeat is one stop, not a KeyboardInterrupt in the middle of the exit.
    interrupt.install()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one CPU share its cores; each taking all of them would oversubscribe it N times.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // spec.devices))
    # The ranks run in lockstep (every forward gathers from all): rank 0's progress speaks for all of them.
    on_progress = log.info if rank == 0 else log.debug
    with open(_rank_file(scratch, rank), "a") as sink:
        def on_metrics(metrics: Dict[str, float]) -> None:
            sink.write(json.dumps(metrics) + "\n")
            sink.flush()

        result = run_inference(spec, ds_config, facts, on_progress=on_progress, on_metrics=on_metrics)
    return {"metrics": result.metrics, "repeats": result.repeats, "output_ids": result.output_ids}


def per_rank(metrics: Dict[str, float], rank: int) -> Dict[str, float]:
    """``metrics`` named as one rank's: ``peak_gpu_allocated_bytes.rank1``."""
    return {f"{name}.rank{rank}": value for name, value in metrics.items()}


class _Watch(threading.Thread):
    """While the ranks run, from the job's process: the peak of the summed RSS of its process tree (itself and
    every descendant), and each rank's metrics passed on to ``on_metrics`` as they appear."""

    def __init__(self, scratch: str, devices: int, on_metrics: Callable[[Dict[str, float]], None]):
        super().__init__(name="zi-ranks-watch", daemon=True)
        self.scratch, self.devices, self.on_metrics = scratch, devices, on_metrics
        self.peak_rss = 0
        self._read = [0] * devices  # bytes of each rank's file already passed on
        self._done = threading.Event()

    def _sample_rss(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for process in (me, *me.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += process.memory_info().rss
        self.peak_rss = max(self.peak_rss, total)

    def _relay(self) -> None:
        for rank in range(self.devices):
            path = _rank_file(self.scratch, rank)
            if not path.is_file():
                continue
            with open(path) as handle:
                handle.seek(self._read[rank])
                text = handle.read()
            complete = text[:text.rfind("\n") + 1]  # a line the rank is still writing waits for the next look
            self._read[rank] += len(complete.encode())
            for line in complete.splitlines():
                self.on_metrics(per_rank(json.loads(line), rank))

    def run(self) -> None:
        while not self._done.wait(RSS_SAMPLE_S):
            self._sample_rss()
            self._relay()

    def stop(self) -> None:
        """Stop watching and pass on what the ranks wrote since the last look."""
        self._done.set()
        self.join()
        self._sample_rss()
        self._relay()


@contextlib.contextmanager
def _elastic_signals() -> Iterator[str]:
    """Elastic's agent handles the signals it is given for as long as the ranks run (its handler raises
    SignalException, upon which it stops every rank with that signal) and does not restore ours afterwards.
    Yields the signals it is to handle: ours that are not ignored (``nohup`` ignores SIGHUP). Its stop becomes
    :class:`zi_app.run.interrupt.Interrupted`, as a signal to a job of one device does, and our handlers come back."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    handled = [signum for signum in interrupt.SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    saved = {signum: signal.getsignal(signum) for signum in handled}
    try:
        yield ",".join(interrupt.signal_name(signum) for signum in handled)
    except SignalException as stop:
        raise interrupt.caught(stop.sigval) from None
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _rank_failed(failed) -> RankFailed:
    """Our error for elastic's ChildFailedError: its root cause (the first rank that failed)."""
    rank, failure = failed.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # written by the rank's error handler: the exception, type and text
        message = message.get("message", "")
    signal_name = failure.signal_name() if failure.exitcode < 0 else None
    return RankFailed(rank, failure.exitcode, signal_name, str(message))


def run_ranks(spec: JobSpec, ds_config: Dict[str, Any], facts: ModelFacts, on_progress: Callable[[str], None] = log.info,
              on_metrics: Callable[[Dict[str, float]], None] = lambda metrics: None) -> InferenceResult:
    """Run the job on ``spec.devices`` ranks, one process each, and return the job's measurements.

    ``on_metrics`` receives every rank's measurements as ``<name>.rank<r>`` as they appear, from another
    thread, then the job's own; the job's peak host RSS also when a rank fails. A rank that fails stops its
    peers and raises :class:`RankFailed`; a signal to this process stops every rank and raises
    :class:`zi_app.run.interrupt.Interrupted`.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not spec.verbose:  # elastic's agent logs its launch settings and each step of its rendezvous
        logging.getLogger("torch.distributed").setLevel(logging.WARNING)
    on_progress(f"starting {spec.devices} ranks, batch {spec.batch} each")
    with tempfile.TemporaryDirectory(prefix="zi-ranks-") as scratch, _elastic_signals() as signals:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=spec.devices, run_id=f"zi-{os.getpid()}",
            # torchrun --standalone's rendezvous: a store of this process on localhost, port 0 = the first
            # free one (no port chosen here and taken by someone else before the store binds it).
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"keep_alive_interval": KEEP_ALIVE_S},
            max_restarts=0, monitor_interval=MONITOR_S, start_method="spawn", signals_to_handle=signals,
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(scratch) / "elastic")))
        watch = _Watch(scratch, spec.devices, on_metrics)
        watch.start()
        try:
            returned = elastic_launch(config, _rank_main)(spec, ds_config, facts, scratch)
        except ChildFailedError as failed:
            raise _rank_failed(failed) from None
        finally:
            watch.stop()
            on_metrics({"peak_host_rss_bytes": watch.peak_rss})
    results = [returned[rank] for rank in range(spec.devices)]
    repeats = job_repeats([r["repeats"] for r in results], spec.batch * spec.devices, spec.prompt_len, spec.gen_len)
    metrics = job_metrics([r["metrics"] for r in results], repeats)
    on_metrics(metrics)  # the job's peak host RSS is already logged, failed or not
    return InferenceResult(metrics={**metrics, "peak_host_rss_bytes": float(watch.peak_rss)}, repeats=repeats,
                           output_ids=[row for r in results for row in r["output_ids"]])


def job_repeats(rank_repeats: List[List[Dict[str, float]]], batch: int, prompt_len: int,
                gen_len: int) -> List[Dict[str, float]]:
    """Each timed ``generate`` of the whole job: the ranks' calls of one repeat ran together, so the job's took
    the slowest rank's time (prefill and decode step too) for all ``batch`` (the job's) prompts."""
    repeats = []
    for calls in zip(*rank_repeats):
        steps = [call["decode_step_s"] for call in calls if "decode_step_s" in call]
        repeats.append(measure.speed_metrics(max(c["latency_s"] for c in calls), max(c["prefill_s"] for c in calls),
                                             max(steps) if steps else None, batch, prompt_len, gen_len))
    return repeats


def job_metrics(rank_metrics: List[Dict[str, float]], repeats: List[Dict[str, float]]) -> Dict[str, float]:
    """The job's metrics from its ranks': speed = the median over its ``repeats`` (:func:`job_repeats`); link
    bandwidth summed (:data:`SUMMED`); every other measurement the worst rank's (max); the roofline made again:
    the busiest rank's bytes over one rank's share of the links. The job's peak host RSS is not a rank's: the
    caller samples it."""
    metrics: Dict[str, float] = {}
    for name in set().union(*rank_metrics):
        if name in DERIVED:
            continue
        values = [m[name] for m in rank_metrics if name in m]
        metrics[name] = sum(values) if name in SUMMED else max(values)
    metrics.update(measure.median_metrics(repeats))
    if "streamed_bytes_per_step" in metrics and "decode_step_s" in metrics:
        roofline = measure.roofline_metrics(metrics["decode_step_s"], int(metrics["streamed_bytes_per_step"]),
                                            metrics["h2d_gbps"] / len(rank_metrics))
        metrics.update(roofline_step_s=roofline["roofline_step_s"], roofline_ratio=roofline["roofline_ratio"])
    return metrics
