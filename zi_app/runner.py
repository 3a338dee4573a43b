"""Load a model under ZeRO-3, generate, and measure: the inference-and-measure step, usable from any app."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from zi_app import engine, measure, model as model_lib
from zi_app.dsconfig import build_ds_config

log = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    """What one job measured: headline metrics, per-repeat metrics, and the last run's token ids."""

    metrics: Dict[str, float]
    repeats: List[Dict[str, float]] = field(default_factory=list)
    output_ids: Optional[List[List[int]]] = None


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int, device) -> torch.Tensor:
    """Seeded random token ids, ``batch`` x ``prompt_len`` (no tokenizer needed, no padding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (batch, prompt_len), generator=generator).to(device)


def generate_kwargs(cfg) -> Dict[str, Any]:
    """Extra ``generate`` arguments from the kvcache group."""
    impl = cfg.kvcache.cache_implementation
    return {"cache_implementation": impl} if impl else {}


def _ignore(metrics: Dict[str, float]) -> None:
    return None


def run_inference(cfg, ds_config: Optional[Dict[str, Any]] = None,
                  on_progress: Callable[[str], None] = log.info,
                  on_metrics: Callable[[Dict[str, float]], None] = _ignore) -> InferenceResult:
    """Build the model under ZeRO-3, run warm-up and timed ``generate`` calls, and return the measurements.

    ``cfg`` is a validated config (see :func:`zi_app.validate`); ``ds_config`` defaults to
    :func:`build_ds_config` of it. ``on_metrics`` receives measurements as soon as they exist (load
    time after loading, peak memory even when generation fails), so a failed job keeps what it measured.
    Run one call per process: ZeRO-3's partitioning hook, the process group and the peak-memory
    counters are process-wide.
    """
    if ds_config is None:
        ds_config = build_ds_config(cfg, decoder_layer_classes(cfg))
    engine.init_distributed()
    engine.cap_gpu_memory(cfg.memory.gpu_budget_gib)
    try:
        with measure.peak_memory() as peaks, model_lib.zero3_construction(ds_config):
            metrics, repeats, output = _load_and_generate(cfg, ds_config, on_progress, on_metrics)
    finally:
        on_metrics(peaks.as_metrics())
    metrics.update(peaks.as_metrics())
    return InferenceResult(metrics=metrics, repeats=repeats, output_ids=output[:, cfg.prompt_len:].tolist())


def _load_and_generate(cfg, ds_config, on_progress, on_metrics):
    on_progress(f"loading {cfg.model.name} ({cfg.model.weights} weights, {cfg.model.dtype}) under ZeRO-3, "
                f"offload={cfg.offload.device}, quant={cfg.quant.mode}")
    with measure.stopwatch() as load:
        model = model_lib.load_model(cfg)
        model = engine.initialize(model, ds_config)
        if cfg.quant.mode == "post":
            model = engine.apply_post_init_quantization(model, ds_config)
    on_progress(f"loaded in {load.seconds:.1f} s")
    on_metrics({"load_s": load.seconds})
    prompts = random_prompts(cfg.batch, cfg.prompt_len, model.config.vocab_size, cfg.seed, engine.device())
    kwargs = generate_kwargs(cfg)
    for i in range(cfg.warmup):
        on_progress(f"warm-up {i + 1}/{cfg.warmup}")
        measure.timed_generate(model, prompts, cfg.gen_len, **kwargs)
    repeats = []
    for i in range(cfg.repeat):
        output, timing = measure.timed_generate(model, prompts, cfg.gen_len, **kwargs)
        repeats.append(measure.throughput_metrics(timing, cfg.batch, cfg.prompt_len, cfg.gen_len))
        on_progress(f"timed {i + 1}/{cfg.repeat}: {repeats[-1]['tokens_per_sec']:.2f} tokens/s, "
                    f"{timing.total_s:.2f} s")
    metrics = measure.median_metrics(repeats)
    metrics["load_s"] = load.seconds
    return metrics, repeats, output


def decoder_layer_classes(cfg) -> Optional[List[str]]:
    """Leaf-module classes for the memory group, or None when it does not ask for them."""
    return model_lib.decoder_layer_classes(dict(cfg.model.arch)) if cfg.memory.leaf_modules else None
