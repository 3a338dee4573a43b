"""Predict a job's GPU memory and choose what ZeRO-3 keeps resident. Pure arithmetic on model facts.

The prediction counts what lives on the GPU at the peak of a decode step:
resident (persistent) weights + KV cache for batch x (prompt_len + gen_len) + prefill activations +
gathered (live) parameters + a fixed allowance for CUDA/cuBLAS workspaces.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
WORKSPACE_BYTES = 1 * 2**30  # cuBLAS/attention workspaces and allocator slack seen on the H200
# Residency is planned against this share of the budget: the caching allocator's fragmentation under
# ZeRO-3's gather/free churn took the rest (an OPT-13B job planned to the full 24 GiB hit OOM with
# 19.9 GiB allocated and 4 GiB reserved but unused).
PLAN_FRACTION = 0.95


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know of a model: its leaf classes and parameter sizes in construction order."""

    leaf_classes: Tuple[str, ...]
    param_numels: Tuple[int, ...]


@dataclass(frozen=True)
class Residency:
    """ZeRO-3 persistence settings and the GPU peak they are predicted to give."""

    param_threshold: int
    model_threshold: int
    resident_bytes: int
    predicted_peak_bytes: int
    offload_needed: Optional[bool] = None  # see offload_needed(); None where the GPU budget is unknown


def persisted_elements(numels: Sequence[int], param_threshold: int, model_threshold: int) -> int:
    """Elements ZeRO-3 keeps resident: DeepSpeed persists, in construction order, each parameter of at
    most ``param_threshold`` elements while the running total stays within ``model_threshold``."""
    total = 0
    for numel in numels:
        if numel <= param_threshold and total + numel <= model_threshold:
            total += numel
    return total


def _layers(arch: Dict[str, Any]) -> int:
    return int(arch.get("num_hidden_layers") or arch.get("n_layer") or 0)


def kv_cache_bytes(arch: Dict[str, Any], batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``seq_len`` tokens."""
    h = int(arch["hidden_size"])
    heads = int(arch.get("num_attention_heads") or arch.get("n_head") or 1)
    kv_dim = h * int(arch.get("num_key_value_heads") or heads) // heads
    return 2 * _layers(arch) * batch * seq_len * kv_dim * dtype_bytes


def activation_bytes(arch: Dict[str, Any], batch: int, prompt_len: int, dtype_bytes: int) -> int:
    """Peak transient activations of the prefill: a layer's hidden states, MLP intermediate and logits."""
    h = int(arch["hidden_size"])
    ffn = int(arch.get("ffn_dim") or arch.get("intermediate_size") or 4 * h)
    tokens = batch * prompt_len
    hidden = tokens * (4 * h + 2 * ffn) * dtype_bytes
    logits = batch * int(arch.get("vocab_size", 0)) * 4 * 2  # last position only, fp32, with a copy
    return hidden + logits


@dataclass(frozen=True)
class Workload:
    """The shapes and storage widths that decide a job's memory."""

    arch: Dict[str, Any]
    dtype: str
    weight_bytes: float  # bytes per stored weight element (less than the dtype's when quantized)
    batch: int
    prompt_len: int
    gen_len: int
    live_elements: int  # stage3_max_live_parameters


def predict(work: Workload, facts: ModelFacts, param_threshold: int, model_threshold: int) -> Residency:
    """Predicted peak GPU bytes allocated by one job with these persistence thresholds."""
    nbytes = DTYPE_BYTES[work.dtype]
    resident = int(persisted_elements(facts.param_numels, param_threshold, model_threshold) * work.weight_bytes)
    live = max(work.live_elements, max(facts.param_numels)) * nbytes
    peak = (resident + live + kv_cache_bytes(work.arch, work.batch, work.prompt_len + work.gen_len, nbytes)
            + activation_bytes(work.arch, work.batch, work.prompt_len, nbytes) + WORKSPACE_BYTES)
    return Residency(param_threshold, model_threshold, resident, peak)


def fits(residency: Residency, budget_bytes: int) -> bool:
    """Whether a residency's predicted peak fits the share of the budget residency is planned against."""
    return residency.predicted_peak_bytes <= budget_bytes * PLAN_FRACTION


def offload_needed(work: Workload, facts: ModelFacts, budget_bytes: int) -> bool:
    """False when every weight plus the workload fits the budget with ``offload=none``: offloading would
    only cost time (each step copies weights the GPU could hold)."""
    return not fits(predict(work, facts, max(facts.param_numels), sys.maxsize), budget_bytes)


def plan_residency(work: Workload, facts: ModelFacts, budget_bytes: int, base_threshold: int) -> Residency:
    """Keep as many weight bytes resident as the budget leaves room for after the workload's needs.

    When every weight fits, every parameter persists: nothing is fetched and, with ``memory.fetch=overlap``,
    ZeRO-3's per-module hooks are removed (zi_app/fetch.py).
    Parameters up to ``base_threshold`` elements (biases, norms) always stay, as in the reference;
    beyond them every parameter smaller than the largest one (the embedding, which is streamed) may
    persist, in construction order, up to what the budget has left once KV cache, activations and
    live parameters fit.
    """
    everything = predict(work, facts, max(facts.param_numels), sys.maxsize)
    if fits(everything, budget_bytes):
        return everything
    base = predict(work, facts, base_threshold, sys.maxsize)
    param_threshold = max(base_threshold, sorted(facts.param_numels)[-2] if len(facts.param_numels) > 1 else 0)
    base_elements = persisted_elements(facts.param_numels, base_threshold, sys.maxsize)
    spare = max(0, int(budget_bytes * PLAN_FRACTION) - base.predicted_peak_bytes)
    return predict(work, facts, param_threshold, base_elements + int(spare / work.weight_bytes))
