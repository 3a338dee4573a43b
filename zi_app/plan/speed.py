"""Predicted speed of a job: a decode step streams the non-resident weights over the host link, pays a host
cost per ZeRO-3 fetch and dequantized matrix, and computes at the GPU's rates; the prefill likewise. A job
of several ranks streams each rank's share over its own link and all-gathers the rest from its peers.
Pure arithmetic; docs/planner.md derives each term and its constants from measured runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from zi_app.plan.facts import ModelFacts
from zi_app.plan.hardware import Hardware
from zi_app.plan.memory import (Residency, cached_kv_bytes, host_bytes, kv_cache_bytes, nvme_bytes,
                                offloaded_kv_bytes, post_quantized, pytorch_dequantization, stored_kv_bytes,
                                streamed_bytes_per_step, weight_total_bytes)
from zi_app.plan.workload import DTYPE_BYTES, Workload

@dataclass(frozen=True)
class Prediction:
    """What a job is predicted to need and to do; the times are None when the hardware's rates are unknown."""

    peak_gpu_bytes: int
    peak_host_bytes: int
    streamed_bytes_per_step: int
    nvme_bytes: int  # disk the weights swapped to NVMe take (offload=nvme)
    decode_step_s: Optional[float]
    prefill_s: Optional[float]
    tokens_per_sec: Optional[float]
    peer_bytes_per_step: int = 0  # bytes each rank all-gathers from its peers per decode step (devices > 1)
    pytorch_dequantization: bool = False  # quantized weights dequantized by DeepSpeed's slow path (not fp16)


def quantized_matrices(work: Workload, facts: ModelFacts) -> int:
    """Weight matrices dequantized in every forward under init-time quantization (each one larger than a bias
    or norm); post-init quantization's replaced matrices cost ``post_quant_overhead_s`` instead."""
    if work.weight_bytes >= DTYPE_BYTES[work.dtype] or work.post_quant_modules:
        return 0
    return sum(numel > work.shape.hidden_size for numel in facts.param_numels)


def _flops_per_token(work: Workload, facts: ModelFacts, context: int) -> float:
    """Forward FLOPs of one token: two per weight, plus attention over ``context`` earlier tokens."""
    return 2.0 * sum(facts.param_numels) + 4.0 * work.shape.layers * context * work.shape.hidden_size


def streamed_weights(work: Workload, facts: ModelFacts, streamed: int) -> int:
    """The weight bytes among ``streamed`` (an offloaded KV cache's left out)."""
    return streamed - offloaded_kv_bytes(work)


def fetches_per_forward(work: Workload, facts: ModelFacts) -> int:
    """ZeRO-3 fetches (hooked module forwards) per forward pass: one per decoder layer with leaf modules."""
    return facts.modules_with_leaves if work.leaf_modules else facts.modules


# GPU seconds per weight element of DeepSpeed 0.19.8's pure-PyTorch dequantization (``DeQuantizer.dequantize``:
# int4 codes unpacked to a byte each by strided stores, copied into a zeroed tensor of the dtype, divided and
# shifted in place, one kernel after another). Measured with BLOOM-176B int4 in bfloat16, batch 12, every weight
# streamed (180 billion elements, 1.83 s of copies): steps of 3.16 s on an H200 and 3.31 s on an H100, whose GPU
# memory bandwidths differ by 1.43x, so neither the link nor GPU memory sets the step; the profile (2026-12-06)
# shows 2.62 s of kernels beside 1.79 s of copies. 1.6e-11 from those runs alone predicted the held-out OPT-13B
# int4 bfloat16 run (batch 32, every weight streamed, 2026-12-07) 23% fast; one constant serves both models to
# within 15% (OPT-13B alone would take 2.0e-11, BLOOM 1.7e-11: a cost per matrix besides the one per element,
# two models too few to fit it).
PYTORCH_DEQUANT_S_PER_ELEMENT = 1.75e-11


# GPU seconds per cached key or value element of a quantized cache kept on the GPU (kvcache.gpu_layers) to
# dequantize for a decode step's attention, PyTorch's separate kernels 64 tokens at a time (kvcache.dequant=torch).
# Fitted on OPT-30B int4, the int4 cache, H100, 2026-12-07: 48, 36 and 19 layers kept at batch 64, 96 and 128 left
# 0.217, 0.292 and 0.195 s a step over the plan without it, 0.91, 1.08 and 1.03e-11 per element (that
# implementation also copied each layer through a slot and transposed it for attention). About a packed element's
# time over a 55 GB/s link (1.0e-11 for int4's 0.56 bytes): keeping a layer dequantized so saves the link what it
# costs the GPU.
KEPT_KV_DEQUANT_S_PER_ELEMENT = 1.0e-11

# The share of the GPU's memory bandwidth Triton's fused dequantization (kvcache.dequant=triton) reaches: one pass
# reading each packed element and its group's scales and writing the value. Measured by benchmarks/kv_dequant.py on
# an H100 (OPT-30B's layer, int4, 543 cached tokens, 2026-12-07): 0.47 and 0.50 of 3350 GB/s at batch 64 and 96 with
# the new token's copy, as a step does it (1.5-1.6e-12 s per element, 7x faster than PyTorch's kernels).
FUSED_KV_DEQUANT_BANDWIDTH_SHARE = 0.5


def kept_kv_dequant_s(work: Workload, hw: Hardware) -> float:
    """GPU seconds a decode step spends dequantizing the cached keys and values of the layers whose quantized cache
    is kept on the GPU (kvcache.gpu_layers; nothing at the model's width, whose layers attention reads as they are):
    PyTorch's kernels at a fitted cost per element, Triton's at the bytes it reads and writes over ``hw``'s memory."""
    if work.kv_bits >= 16 or not work.kv_gpu_layers:
        return 0.0
    values = cached_kv_bytes(work) * work.kv_gpu_layers // max(1, work.shape.layers)  # at the model's width
    if not work.kv_fused_dequant:
        return values // DTYPE_BYTES[work.dtype] * KEPT_KV_DEQUANT_S_PER_ELEMENT
    moved = stored_kv_bytes(work, values) + values  # the packed codes and their scales in, the values out
    return moved / (hw.gpu_memory_gbps * 1e9 * FUSED_KV_DEQUANT_BANDWIDTH_SHARE)


def pytorch_dequant_s(work: Workload, gathered_bytes: int) -> float:
    """GPU seconds spent dequantizing ``gathered_bytes`` of fetched quantized weights on DeepSpeed's
    pure-PyTorch path (:func:`pytorch_dequantization`); 0 where its float16 kernel serves."""
    if not pytorch_dequantization(work):
        return 0.0
    return gathered_bytes / work.weight_bytes * PYTORCH_DEQUANT_S_PER_ELEMENT


def decode_compute_s(work: Workload, facts: ModelFacts, hw: Hardware) -> float:
    """GPU seconds of one decode step: every weight and the KV cache read from GPU memory, and two FLOPs
    per weight and token plus attention, at the GPU's effective rates."""
    context = work.prompt_len + work.gen_len // 2
    # attending on the host, the GPU reads no cached keys and values
    kv = 0 if work.kv_attend_on_host else kv_cache_bytes(work.shape, work.batch, context, DTYPE_BYTES[work.dtype])
    memory = hw.gpu_memory_gbps * 1e9 * hw.memory_efficiency
    flops = hw.gpu_tflops * 1e12 * hw.compute_efficiency
    return (weight_total_bytes(work, facts) + kv) / memory + work.batch * _flops_per_token(work, facts, context) / flops


def prefill_flops(work: Workload, facts: ModelFacts) -> float:
    """FLOPs of the prefill: every prompt token through every weight, and causal attention."""
    return work.batch * work.prompt_len * _flops_per_token(work, facts, work.prompt_len // 2)


def rank_traffic(work: Workload, facts: ModelFacts, streamed: int) -> Tuple[int, int]:
    """(bytes over a rank's own host link, bytes it all-gathers from its peers) per decode step, of the job's
    ``streamed`` bytes: ZeRO-3 partitions each offloaded weight across the ranks, so each rank copies its
    1/ranks share from host memory and receives the rest from the other ranks; an offloaded KV cache is each
    rank's own (its batch) and crosses its own link whole."""
    weights = streamed_weights(work, facts, streamed)
    own = math.ceil(weights / work.ranks)
    return streamed - weights + own, weights - own


def predict_times(work: Workload, facts: ModelFacts, streamed: int, hw: Hardware,
                  peer_bytes: int = 0) -> Tuple[float, float]:
    """(prefill seconds, decode step seconds) of one rank of ``work`` on ``hw`` (which must have its rates,
    and ``gpu_peer_gbps`` when ``peer_bytes``).

    A decode step streams ``streamed`` bytes at the link's effective rate (an offloaded KV cache both ways)
    while the all-gather receives ``peer_bytes`` from the other ranks at ``gpu_peer_gbps`` (the slower of the
    two counts), pays ``fetch_overhead_s`` per ZeRO-3 fetch, ``dequant_overhead_s`` per quantized matrix
    (``post_quant_overhead_s`` per matrix post-init quantization replaced) and
    ``step_overhead_s`` once, and computes at the GPU's rates (:func:`decode_compute_s`). The prefill streams
    the same weights while it computes ``batch x prompt_len`` tokens; the larger of the two costs it. DeepSpeed's
    pure-PyTorch dequantization (:func:`pytorch_dequant_s`) is GPU work beside the copies and after the compute.
    """
    pinned_gbps = hw.h2d_pinned_gbps * hw.stream_efficiency * 1e9
    pinned = work.pin or work.offload == "none"
    gbps = pinned_gbps if pinned else hw.h2d_pageable_gbps * hw.pageable_efficiency * 1e9
    weights = streamed_weights(work, facts, streamed)
    # transformers' offloaded KV cache sends each layer to (pinned) host memory after its update and back before
    # the next step; the two copies serialise with each other but overlap ZeRO-3's weight copies on their own
    # stream (measured: OPT-6.7B batch 64 fully resident, 17.2 GB of cache, 0.84 s a step).
    # Ours (kvcache=cpu) sends only the new tokens down and brings each layer's prefix up on a side stream that
    # shares the link with the weights (measured: OPT-6.7B batch 64, 17.2 GB of cache, 0.341 s a step, 1.10x).
    kv = offloaded_kv_bytes(work)
    # Attending on the host (kvcache.attention=host), the link carries the weights and each layer's attention
    # output, and the host thread reads the cache. That thread is the one that issues the fetches, one module
    # ahead, so the link idles while it attends: the two add (measured: OPT-30B int4 batch 64 on an H100,
    # 0.31 s of weights at 55 GB/s + 47.9 GB of cache at the host's 51 GB/s = 1.25 s; the step took 1.236 s).
    host_attention_s = cached_kv_bytes(work) / (hw.host_attention_gbps * 1e9) if work.kv_attend_on_host else 0.0
    if work.kv_preallocated:
        copies_s = (weights + kv) / gbps
    else:
        copies_s = max(weights / gbps + kv / pinned_gbps, 2 * kv / pinned_gbps)
    # The host walks ZeRO-3's hooks of every parameter while copies run: with little to stream, that walk
    # is the floor of a step (OPT-13B fully resident: 0.108 s where 0.01 s of copies remain).
    hooks = not (work.overlap_fetch and weights == 0)
    peer_s = peer_bytes / (hw.gpu_peer_gbps * 1e9) if peer_bytes else 0.0
    stream_s = max(copies_s, peer_s, len(facts.param_numels) * hw.param_overhead_s * hooks)
    host_s = (fetches_per_forward(work, facts) * hw.fetch_overhead_s * hooks
              + quantized_matrices(work, facts) * hw.dequant_overhead_s
              + sum(post_quantized(work, facts)) * hw.post_quant_overhead_s)
    # The overlapping fetch path issues the next fetch's copies before the current module runs, so the host's
    # per-fetch and dequantization work hides behind the copies instead of adding to them.
    fetch_s = max(stream_s, host_s) if work.overlap_fetch else stream_s + host_s
    # DeepSpeed's pure-PyTorch dequantization is GPU kernels: they run while later copies stream, and after the
    # other kernels (BLOOM-176B int4 bfloat16, batch 12: a 3.2-3.3 s step for 1.83 s of copies; a 6.5-6.8 s
    # prefill for 3.9 s of prompt compute).
    dequant_s = pytorch_dequant_s(work, weights + peer_bytes)
    decode_s = (max(fetch_s, dequant_s) + host_attention_s + kept_kv_dequant_s(work, hw)
                + decode_compute_s(work, facts, hw) + hw.step_overhead_s)
    compute_s = prefill_flops(work, facts) / (hw.gpu_tflops * 1e12 * hw.compute_efficiency)
    prefill_s = max(fetch_s, compute_s + dequant_s) + hw.step_overhead_s
    return prefill_s, decode_s


def tokens_per_sec(batch: int, gen_len: int, prefill_s: float, decode_step_s: float) -> float:
    """The ``tokens_per_sec`` metric's definition: generated tokens over prefill plus every decode step."""
    return batch * gen_len / (prefill_s + (gen_len - 1) * decode_step_s)


def predict_job(work: Workload, facts: ModelFacts, residency: Residency, hw: Hardware) -> Prediction:
    """Everything predicted of one job: memory from ``residency`` (GPU peak and streamed bytes per rank, host
    memory of the whole job), speed when ``hw`` has its rates (and its peer rate, for more than one rank);
    tokens/s counts every rank's batch."""
    streamed, peer = rank_traffic(work, facts, streamed_bytes_per_step(work, facts, residency))
    prefill_s = decode_s = speed = None
    if hw.has_gpu_rates and (not peer or hw.gpu_peer_gbps is not None):
        prefill_s, decode_s = predict_times(work, facts, streamed, hw, peer_bytes=peer)
        speed = tokens_per_sec(work.batch * work.ranks, work.gen_len, prefill_s, decode_s)
    return Prediction(peak_gpu_bytes=residency.predicted_peak_bytes, peak_host_bytes=host_bytes(work, facts, residency),
                      streamed_bytes_per_step=streamed, nvme_bytes=nvme_bytes(work, facts), decode_step_s=decode_s,
                      prefill_s=prefill_s, tokens_per_sec=speed, peer_bytes_per_step=peer,
                      pytorch_dequantization=pytorch_dequantization(work))


# A sweep's time plan (the launcher's "about 12 min left"). Loading reads and partitions the weights at
# about this rate (measured on the H200); every job also starts a process, imports torch and DeepSpeed
# and builds its engine.
LOAD_GBPS = 1.2
JOB_OVERHEAD_S = 30.0


def predicted_job_s(prediction: Prediction, checkpoint_bytes: int, warmup: int, repeat: int,
                    gen_len: int) -> Optional[float]:
    """Predicted wall seconds of one job: its overhead, loading ``checkpoint_bytes``, ``warmup`` generates
    of two tokens (the runner's) and ``repeat`` of ``gen_len``, each a prefill and its decode steps; None
    where the speed is not predicted."""
    if prediction.prefill_s is None or prediction.decode_step_s is None:
        return None

    def generate_s(tokens: int) -> float:
        return prediction.prefill_s + (tokens - 1) * prediction.decode_step_s

    return (JOB_OVERHEAD_S + checkpoint_bytes / (LOAD_GBPS * 1e9)
            + warmup * generate_s(min(2, gen_len)) + repeat * generate_s(gen_len))
