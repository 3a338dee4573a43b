"""Load a model under ZeRO-3, generate, and measure: the inference-and-measure step, usable from any app."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from zi_app.config.schema import JobSpec
from zi_app.plan import hardware as machine
from zi_app.plan.facts import ModelFacts
from zi_app.run import engine, heap, kvcache, lm_head, loading, measure, progress

log = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    """What one job measured: headline metrics, per-repeat metrics, the last run's token ids and, with
    ``profile_step``, the profiled decode step's Chrome traces by name (:func:`zi_app.run.measure.decode_step_trace`)."""

    metrics: Dict[str, float]
    repeats: List[Dict[str, float]] = field(default_factory=list)
    output_ids: Optional[List[List[int]]] = None
    step_traces: Dict[str, List[dict]] = field(default_factory=dict)


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int, device) -> torch.Tensor:
    """Seeded random token ids, ``batch`` x ``prompt_len`` (no tokenizer needed, no padding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, prompt_len), generator=generator).to(device)


def rank_prompts(spec: JobSpec, vocab_size: int, device) -> torch.Tensor:
    """This rank's ``batch`` prompts: its slice of the job's ``batch * devices`` seeded prompts, so that a job
    generates for the same prompts however many ranks share them (rank 0 of 1 takes them all)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prompts = random_prompts(spec.batch * spec.devices, spec.prompt_len, vocab_size, spec.seed, device)
    return prompts[rank * spec.batch:(rank + 1) * spec.batch]


class GenerateArgs:
    """Extra ``generate`` arguments from the kvcache group, made anew by each call: ``kvcache=cpu`` gives each
    ``generate`` a new cache over the job's one host KV memory (:mod:`zi_app.run.kvcache`)."""

    def __init__(self, cache_implementation: Optional[str] = None, memory: Optional[kvcache.HostKV] = None) -> None:
        self.fixed = {"cache_implementation": cache_implementation} if cache_implementation else {}
        self.memory = memory

    def __call__(self) -> Dict[str, Any]:
        return {"past_key_values": self.memory.cache()} if self.memory is not None else dict(self.fixed)

    def metrics(self) -> Dict[str, float]:
        """``kv_host_bytes``: the host buffers of ``kvcache=cpu``; ``kv_gpu_layers``, ``kv_gpu_bytes``: the layers
        whose cache it keeps on the GPU, and those layers' buffers there (absent with another cache)."""
        if self.memory is None:
            return {}
        return {"kv_host_bytes": float(self.memory.host_bytes()), "kv_gpu_layers": float(self.memory.gpu_layers),
                "kv_gpu_bytes": float(self.memory.kept_store_bytes())}


@contextlib.contextmanager
def generate_arguments(spec: JobSpec) -> Iterator[GenerateArgs]:
    """The job's :class:`GenerateArgs`; ``kvcache=cpu``'s host memory is unlocked on exit."""
    impl = spec.kvcache.cache_implementation
    if impl != "host":
        yield GenerateArgs(impl)
        return
    with kvcache.host_kv(spec.model.shape.layers, spec.prompt_len + spec.gen_len, spec.pin,
                         attend_on_host=spec.kvcache.attends_on_host, bits=spec.kvcache.bits,
                         gpu_layers=spec.kvcache.planned_gpu_layers, dequant=spec.kvcache.planned_dequant) as memory:
        yield GenerateArgs(memory=memory)


def _ignore(metrics: Dict[str, float]) -> None:
    return None


def run_inference(spec: JobSpec, ds_config: Dict[str, Any], facts: ModelFacts, on_progress: Callable[[str], None] = log.info,
                  on_metrics: Callable[[Dict[str, float]], None] = _ignore) -> InferenceResult:
    """Build the model under ZeRO-3, run warm-up and timed ``generate`` calls, and return the measurements.

    ``spec``, ``ds_config`` and ``facts`` come from the job's plan (:func:`zi_app.plan.job.ready`). ``on_metrics`` receives every
    measurement once, as soon as it exists (load time after loading, peak memory even when generation
    fails), so a failed job keeps what it measured. Run one call per process: ZeRO-3's partitioning
    hook, the process group and the peak-memory counters are process-wide.
    """
    heap.return_large_blocks()
    engine.select_pin_backend(spec.memory.pin_backend)
    engine.init_distributed(spec.verbose)
    engine.cap_gpu_memory(spec.memory.gpu_budget_gib)
    try:
        with measure.peak_memory() as peaks, loading.zero3_construction(ds_config):
            metrics, repeats, output, traces = _load_and_generate(spec, ds_config, facts, on_progress, on_metrics)
    finally:
        on_metrics(peaks.as_metrics())
    metrics.update(peaks.as_metrics())
    return InferenceResult(metrics=metrics, repeats=repeats, output_ids=output[:, spec.prompt_len:].tolist(),
                           step_traces=traces)


def _load_and_generate(spec: JobSpec, ds_config, facts, on_progress, on_metrics):
    on_progress(f"loading {spec.model.name} ({spec.model.weights} weights, {spec.model.dtype}) under ZeRO-3, "
                f"offload={spec.offload.device}, quant={spec.quant.mode}")
    before_load = measure.host_rss_bytes()
    with measure.stopwatch() as load:
        with loading.loading_progress(spec, facts):
            model = loading.load_model(spec)
        lm_head.fold_batch(model)
        if spec.kvcache.attends_on_host:
            kvcache.attend_on_host(model)
        overlap = spec.memory.max_inflight_fetches if spec.memory.fetch == "overlap" else None
        model = engine.initialize(model, ds_config, overlap_fetches=overlap)
        heap.trim()
    on_progress(f"loaded in {load.seconds:.1f} s")
    loaded = {"load_s": load.seconds, "host_rss_before_load_bytes": before_load,
              "host_rss_loaded_bytes": measure.host_rss_bytes()}
    on_metrics(loaded)
    prompts = rank_prompts(spec, model.config.vocab_size, engine.device())
    with generate_arguments(spec) as kwargs:
        speed, repeats, output = timed_generates(spec, model, prompts, on_progress, kwargs)
        traces = _measure_steps(spec, model, prompts, kwargs, speed, on_progress)
        speed.update(kwargs.metrics())
    on_metrics(speed)
    return {**speed, **loaded}, repeats, output, traces


def _measure_steps(spec: JobSpec, model, prompts, kwargs: GenerateArgs, speed: Dict[str, float],
                   on_progress: Callable[[str], None]) -> Dict[str, List[dict]]:
    """Add the roofline (CUDA) and, with ``profile_step``, the decode step's breakdown to ``speed``; returns
    the profiled step's traces with ``profile_step`` (``decode_step_timeline``: the CUDA side at real timing,
    the one the roofline counts bytes in; ``decode_step_python``: with the Python tracer), else none."""
    traces = {}
    if torch.cuda.is_available() and "decode_step_s" in speed:
        timeline = measure.decode_step_trace(model, prompts, **kwargs())
        speed.update(roofline(spec, measure.htod_bytes(timeline), speed["decode_step_s"]))
        on_progress(f"decode step {speed['decode_step_s']:.4f} s: {progress.roofline_text(speed)}")
        if spec.profile_step:
            traces["decode_step_timeline"] = timeline
    if spec.profile_step:
        traces["decode_step_python"] = measure.decode_step_trace(model, prompts, python=True, **kwargs())
        speed.update(measure.decode_step_breakdown(traces["decode_step_python"]))
        on_progress("profiled decode step: " + ", ".join(f"{k.removeprefix('profile_')} {v:.4g}"
                                                         for k, v in speed.items() if k.startswith("profile_")))
    return traces


def timed_generates(spec: JobSpec, model, prompts: torch.Tensor, on_progress: Callable[[str], None] = log.info,
                    kwargs: Callable[[], Dict[str, Any]] = dict):
    """``spec.warmup`` untimed and ``spec.repeat`` timed greedy generates of ``model`` (any causal LM, under
    ZeRO-3 or not), each with the arguments ``kwargs()`` gives (:func:`generate_arguments`); returns the median
    speed metrics, each repeat's metrics and the last output ids."""
    for i in range(spec.warmup):
        # Two tokens run the prefill and a decode step: every kernel, allocation and ZeRO-3's fetch
        # trace is warm, at a fraction of a full generate's cost when each step streams the model.
        on_progress(f"warm-up {i + 1}/{spec.warmup}")
        measure.timed_generate(model, prompts, min(2, spec.gen_len), label=f"warm-up {i + 1}/{spec.warmup}",
                               **kwargs())
    repeats = []
    for i in range(spec.repeat):
        output, timing = measure.timed_generate(model, prompts, spec.gen_len, label=f"repeat {i + 1}/{spec.repeat}",
                                                **kwargs())
        repeats.append(measure.throughput_metrics(timing, spec.batch, spec.prompt_len, spec.gen_len))
        on_progress(f"timed {i + 1}/{spec.repeat}: {repeats[-1]['tokens_per_sec']:.2f} tokens/s, "
                    f"{timing.total_s:.2f} s")
    return measure.median_metrics(repeats), repeats, output


def roofline(spec: JobSpec, streamed: int, decode_step_s: float) -> Dict[str, float]:
    """Roofline figures of this job on CUDA, a decode step having streamed ``streamed`` bytes to the GPU:
    bandwidth, bytes streamed per decode step, bound and ratio."""
    bandwidth = machine.cached_h2d_bandwidth(spec.cache_dir) or machine.measure_h2d_bandwidth(spec.cache_dir)
    metrics = measure.roofline_metrics(decode_step_s, streamed, bandwidth["pinned" if spec.pin else "pageable"])
    metrics.update({"h2d_pinned_gbps": bandwidth["pinned"], "h2d_pageable_gbps": bandwidth["pageable"]})
    attention = bandwidth.get(f"host_attention_{spec.model.dtype}")
    if attention is not None:
        metrics["host_attention_gbps"] = attention
    return metrics
