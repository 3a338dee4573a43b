"""Measurements as small context managers and a per-token clock for ``generate``.

Metric names are part of the interface (docs/metrics.md explains each one); they are produced here and
nowhere else.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from transformers import StoppingCriteria

from zi_app.run import interrupt
from zi_app.run.progress import progress


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class PeakMemory:
    """Peaks seen while the context was open (GPU figures only on CUDA)."""

    host_rss_bytes: int = 0
    gpu_allocated_bytes: Optional[int] = None
    gpu_reserved_bytes: Optional[int] = None

    def as_metrics(self) -> Dict[str, float]:
        metrics = {"peak_host_rss_bytes": float(self.host_rss_bytes)}
        if self.gpu_allocated_bytes is not None:
            metrics["peak_gpu_allocated_bytes"] = float(self.gpu_allocated_bytes)
            metrics["peak_gpu_reserved_bytes"] = float(self.gpu_reserved_bytes)
        return metrics


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Record the process's peak host RSS (:func:`peak_rss_bytes`) and peak CUDA memory over the block.

    The host peak is the whole process's so far: run one job per process (the launcher does) so that it is
    the peak of this job, loading included, as the reference script reports it.
    """
    peaks = PeakMemory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield peaks
    finally:
        peaks.host_rss_bytes = peak_rss_bytes()
        if torch.cuda.is_available():
            peaks.gpu_allocated_bytes = torch.cuda.max_memory_allocated()
            peaks.gpu_reserved_bytes = torch.cuda.max_memory_reserved()


def peak_rss_bytes() -> int:
    """The process's own peak resident set: ``VmHWM`` of /proc/self/status, where there is one. ``ru_maxrss`` is
    not the process's own on Linux: exec carries into it the resident set of the memory it replaces, the parent's
    (its peak under vfork), so a job started by a sweep's driver or a test worker reported the larger of the two."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_rss_bytes() -> int:
    """The process's resident host memory now (not its peak)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class Stopwatch:
    """Wall seconds of a block, the device synchronised at both ends."""

    seconds: float = 0.0


@contextlib.contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Time a block; queued device work is finished before the clock starts and stops."""
    watch = Stopwatch()
    _synchronize()
    start = time.perf_counter()
    try:
        yield watch
    finally:
        _synchronize()
        watch.seconds = time.perf_counter() - start


class TokenClock(StoppingCriteria):
    """Stamps the time each new token is ready; generate calls it once per forward step.

    Never stops generation, but raises at a signal (:func:`zi_app.run.interrupt.check`): each step is a safe
    point. The stamp follows a device sync, so step times are real device times.
    ``on_token`` is called after each stamp (a progress bar's tick: its microseconds fall into the next
    step's time, never into the one just stamped).
    """

    def __init__(self, on_token: Optional[Callable[[], None]] = None) -> None:
        self.stamps: List[float] = []
        self.on_token = on_token

    def __call__(self, input_ids, scores, **kwargs):
        _synchronize()
        self.stamps.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token()
        interrupt.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class GenerateTiming:
    """One timed ``generate``: total wall time, prefill (up to the first new token) and each decode step."""

    total_s: float
    prefill_s: float
    step_s: List[float] = field(default_factory=list)


def timed_generate(model, input_ids: torch.Tensor, gen_len: int, label: str = "generate", **generate_kwargs):
    """Run greedy ``generate`` producing exactly ``gen_len`` tokens; return (output ids, timing).

    Its decode steps show as progress named ``label`` (:mod:`zi_app.progress`).
    """
    with progress(label, gen_len, unit="step") as bar:
        clock = TokenClock(on_token=bar.update)
        _synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                min_new_tokens=gen_len, max_new_tokens=gen_len, stopping_criteria=[clock], **generate_kwargs)
        _synchronize()
        total = time.perf_counter() - start
    stamps = [start] + clock.stamps
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return output, GenerateTiming(total_s=total, prefill_s=stamps[1] - start, step_s=steps)


def throughput_metrics(timing: GenerateTiming, batch: int, prompt_len: int, gen_len: int) -> Dict[str, float]:
    """The speed metrics of one timed generate.

    tokens_per_sec counts generated tokens only (batch * gen_len) over the whole generate, prefill
    included (the reference table's metric); decode figures exclude the first token.
    """
    step_s = statistics.median(timing.step_s) if timing.step_s else None
    return speed_metrics(timing.total_s, timing.prefill_s, step_s, batch, prompt_len, gen_len)


def speed_metrics(total_s: float, prefill_s: float, decode_step_s: Optional[float], batch: int, prompt_len: int,
                  gen_len: int) -> Dict[str, float]:
    """The speed metrics of ``batch`` prompts generated in ``total_s`` seconds, ``prefill_s`` of them up to the
    first new token; the decode figures only when there was a decode step (``decode_step_s`` not None)."""
    metrics = {
        "tokens_per_sec": batch * gen_len / total_s,
        "latency_s": total_s,
        "prefill_s": prefill_s,
        "prefill_tokens_per_sec": batch * prompt_len / prefill_s,
    }
    if decode_step_s is not None:
        metrics["decode_step_s"] = decode_step_s
        metrics["decode_tokens_per_sec"] = batch * (gen_len - 1) / (total_s - prefill_s)
    return metrics


def median_metrics(runs: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-metric median over repeated timed runs."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


class _DecodeStepProfiler(StoppingCriteria):
    """Profiles exactly the first decode step: starts after the prefill's token, stops after the next."""

    def __init__(self, profiler) -> None:
        self.profiler = profiler
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.profiler.start()
        elif self.calls == 2:
            _synchronize()
            self.profiler.stop()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_trace(model, input_ids: torch.Tensor, python: bool = False, **generate_kwargs) -> List[dict]:
    """Chrome-trace events (complete events, ``"ph": "X"``) of one profiled decode step: an extra, untimed
    ``generate`` of 3 tokens.

    Without ``python`` the trace holds the CUDA side only (copies, kernels, runtime calls such as the host's
    synchronisations) at the step's real timing. ``python`` adds CPU ops and the Python tracer (every Python
    call becomes an event), which slows the host side: use it for where the time goes, not for how long a
    step takes.
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] if python else []
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities, with_stack=python)
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                       min_new_tokens=3, max_new_tokens=3, stopping_criteria=[_DecodeStepProfiler(profiler)],
                       **generate_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        profiler.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as handle:
            return [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X"]


def htod_bytes(events: List[dict]) -> int:
    """Bytes copied host->device in a step's trace (:func:`decode_step_trace`), from the CUDA profiler's
    memcpy records.

    This is what the step really streams: resident parameters cost nothing, a weight fetched twice
    counts twice, and an offloaded KV cache's transfers count too.
    """
    return sum(int(e.get("args", {}).get("bytes", 0)) for e in events
               if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", ""))


def busy_spans(events: List[dict]) -> List[Tuple[float, float]]:
    """The union of trace events' intervals as disjoint (start, stop) spans in the trace's microseconds, in
    order (overlaps and nesting counted once)."""
    spans: List[Tuple[float, float]] = []
    for start, stop in sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((start, stop))
    return spans


def _busy_seconds(events: List[dict]) -> float:
    """Seconds covered by the union of the events' intervals."""
    return sum(stop - start for start, stop in busy_spans(events)) / 1e6


# DeepSpeed 0.19.8's per-module forward hooks (parameter_offload.py): fetch before, release after.
_ZERO3_HOOKS = ("pre_sub_module_forward_function", "post_sub_module_forward_function")
_HOST_WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def decode_step_breakdown(events: List[dict]) -> Dict[str, float]:
    """Where one decode step's time goes, from its trace with the Python tracer on
    (:func:`decode_step_trace` with ``python``).

    Host side: time inside ZeRO-3's forward hooks (fetch/prefetch/release) and blocked in CUDA
    synchronisation calls. Device side: copy-engine and kernel busy time, dequantization kernels, and
    the time neither a copy nor a kernel ran (the GPU waiting on the host). The tracer inflates host
    time, so the shares matter, not the absolute step time (``decode_step_s`` is the real one).
    """
    def named(category: str, *suffixes: str) -> List[dict]:
        return [e for e in events if e.get("cat") == category and e.get("name", "").endswith(suffixes or ("",))]

    step_s = (max(e["ts"] + e.get("dur", 0) for e in events) - min(e["ts"] for e in events)) / 1e6
    breakdown = {
        "profile_step_s": step_s,
        "profile_zero3_hook_s": _busy_seconds(named("python_function", *_ZERO3_HOOKS)),
        "profile_zero3_fetches": float(len(named("python_function", _ZERO3_HOOKS[0]))),
    }
    if torch.cuda.is_available():
        copies = [e for e in named("gpu_memcpy") if "HtoD" in e["name"]]
        kernels = named("kernel")
        breakdown.update({
            "profile_host_sync_wait_s": _busy_seconds(named("cuda_runtime", *_HOST_WAITS)),
            "profile_htod_busy_s": _busy_seconds(copies),
            "profile_kernel_busy_s": _busy_seconds(kernels),
            "profile_dequant_kernel_s": _busy_seconds([e for e in kernels if "dequant" in e["name"].lower()]),
            "profile_gpu_idle_s": step_s - _busy_seconds(copies + kernels),
        })
    return breakdown


def roofline_metrics(decode_step_s: float, streamed_bytes: int, gbps: float) -> Dict[str, float]:
    """A decode step against the PCIe bound: streaming ``streamed_bytes`` at ``gbps`` takes roofline_step_s."""
    roofline_step_s = streamed_bytes / (gbps * 1e9)
    return {"h2d_gbps": gbps, "streamed_bytes_per_step": float(streamed_bytes), "roofline_step_s": roofline_step_s,
            "roofline_ratio": decode_step_s / roofline_step_s if roofline_step_s else float("nan")}
