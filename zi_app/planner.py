"""Predict a job before it runs and choose what ZeRO-3 keeps resident. Pure arithmetic on model facts.

GPU memory: what lives on the GPU at the peak of the job: resident (persistent) weights + KV cache +
prefill activations + gathered (live) parameters + a fixed allowance for CUDA/cuBLAS workspaces.
Host memory: the process's base + every offloaded weight (pinned buffers rounded up to powers of two).
Speed: a decode step streams the non-resident weights over the host link, pays a host cost per ZeRO-3
fetch, and computes at the GPU's rates; the prefill likewise. A job of several ranks (``devices``) holds
the resident weights on every rank and partitions the offloaded ones: each rank streams its share over its
own link and all-gathers the rest from its peers. docs/planner.md derives each term and its
constants from measured runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# cuBLAS/attention workspaces and transients beside the modelled terms (fitted: OPT-13B and OPT-30B peaks on
# the H200, docs/planner.md).
WORKSPACE_BYTES = int(0.3 * 2**30)
# Residency is planned so that the predicted allocated peak stays within this share of the budget: the
# caching allocator's fragmentation under ZeRO-3's gather/free churn takes the rest (measured: 20.8 GiB
# allocated for 24.0 reserved under a 24 GiB budget, 43.2 for 48.0 under 48 GiB; an OPT-13B job planned
# to the full 24 GiB hit OOM with 19.9 GiB allocated and 4 GiB reserved but unused).
PLAN_FRACTION = 0.87
# Host RSS of a job process beyond its weights: Python, torch, CUDA, DeepSpeed (OPT-13B, pageable, H200:
# 25.91 GiB peak for 23.94 GiB of fp16 weights).
HOST_BASE_BYTES = int(1.97 * 2**30)


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know of a model: its leaf classes and parameter sizes in construction order."""

    leaf_classes: Tuple[str, ...]
    param_numels: Tuple[int, ...]
    # Modules whose forward ZeRO-3 hooks (one fetch each), without and with decoder layers as leaf modules.
    modules: int = 0
    modules_with_leaves: int = 0
    # Per parameter: the name of the Linear or Embedding module it is the weight of ("" for any other), what
    # DeepSpeed's post-init quantization matches its keys against.
    weight_modules: Tuple[str, ...] = ()
    # Elements zero.Init partitions while the model is built: a tied weight once per module built with it.
    constructed_numel: int = 0


@dataclass(frozen=True)
class Residency:
    """ZeRO-3 persistence settings and the GPU peak they are predicted to give."""

    param_threshold: int
    model_threshold: int
    resident_bytes: int
    predicted_peak_bytes: int
    offload_needed: Optional[bool] = None  # see offload_needed(); None where the GPU budget is unknown


def persisted(numels: Sequence[int], param_threshold: int, model_threshold: int) -> Tuple[bool, ...]:
    """Which parameters ZeRO-3 keeps resident: DeepSpeed persists, in construction order, each parameter of
    at most ``param_threshold`` elements while the running total stays within ``model_threshold``."""
    total, kept = 0, []
    for numel in numels:
        keep = numel <= param_threshold and total + numel <= model_threshold
        total += numel if keep else 0
        kept.append(keep)
    return tuple(kept)


def persisted_elements(numels: Sequence[int], param_threshold: int, model_threshold: int) -> int:
    """Elements of the parameters :func:`persisted` keeps resident."""
    return sum(numel for numel, keep in zip(numels, persisted(numels, param_threshold, model_threshold)) if keep)


def _layers(arch: Dict[str, Any]) -> int:
    return int(arch.get("num_hidden_layers") or arch.get("n_layer") or 0)


def kv_cache_bytes(arch: Dict[str, Any], batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``seq_len`` tokens."""
    h = int(arch["hidden_size"])
    heads = int(arch.get("num_attention_heads") or arch.get("n_head") or 1)
    kv_dim = h * int(arch.get("num_key_value_heads") or heads) // heads
    return 2 * _layers(arch) * batch * seq_len * kv_dim * dtype_bytes


def activation_bytes(arch: Dict[str, Any], batch: int, prompt_len: int, dtype_bytes: int) -> int:
    """Peak transient activations of the prefill, inside one layer's MLP: the residual and normalised hidden
    states and the MLP's intermediate before and after its activation function, for every prompt token."""
    h = int(arch["hidden_size"])
    ffn = int(arch.get("ffn_dim") or arch.get("intermediate_size") or 4 * h)
    return batch * prompt_len * (2 * h + 2 * ffn) * dtype_bytes


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
    offload: str = "cpu"  # offload_param.device: none, cpu or nvme
    pin: bool = True
    kv_offloaded: bool = False  # the KV cache lives in host memory (kvcache=cpu)
    leaf_modules: bool = False
    refetch_tied: bool = False  # a tied embedding / LM head is fetched twice per step
    reads_checkpoint: bool = False  # weights come from files (mapped into host memory while loading)
    nvme_buffer_elements: int = 0  # offload_param.buffer_count * buffer_size (NVMe offload)
    # memory.fetch=overlap: the host's per-fetch work runs while copies are in flight, and no hooks remain
    # when every weight is resident (zi_app/fetch.py)
    overlap_fetch: bool = False
    post_quant_modules: Tuple[str, ...] = ()  # weight_quantization.post_init_quant's keys (quant=int8-post/int4-post)
    ranks: int = 1  # processes (devices) one job spans; batch is per rank


def post_quantized(work: Workload, facts: ModelFacts) -> Tuple[bool, ...]:
    """Which parameters post-init quantization replaces: the weight of each Linear or Embedding module whose
    name contains one of its keys (DeepSpeed's own matching)."""
    names = facts.weight_modules or ("",) * len(facts.param_numels)
    return tuple(bool(name) and any(key in name for key in work.post_quant_modules) for name in names)


def stored_bytes(work: Workload, facts: ModelFacts) -> Tuple[int, ...]:
    """Each parameter's bytes between steps: the quantized width for every weight under init-time
    quantization and for the replaced ones after post-init quantization, the dtype's for the rest."""
    if not work.post_quant_modules:
        return tuple(int(numel * work.weight_bytes) for numel in facts.param_numels)
    nbytes = DTYPE_BYTES[work.dtype]
    return tuple(int(numel * (work.weight_bytes if replaced else nbytes))
                 for numel, replaced in zip(facts.param_numels, post_quantized(work, facts)))


def predict(work: Workload, facts: ModelFacts, param_threshold: int, model_threshold: int) -> Residency:
    """Predicted peak GPU bytes allocated by one job with these persistence thresholds.

    The peak is the larger of the prefill's (KV cache of the prompt + a layer's activations for every
    prompt token) and the last decode step's (KV cache of the whole sequence), each with the resident
    weights, the gathered (live) parameters of a layer when any weight is streamed, and a fixed workspace.
    An offloaded KV cache holds two layers on the GPU in a decode step (the one computing and the one
    prefetched) and one in the prefill (the one computing: nothing is prefetched yet). Post-init quantization replaces its weights by new parameters ZeRO-3
    never persists: they are streamed at their quantized width and dequantized one matrix at a time.
    """
    nbytes = DTYPE_BYTES[work.dtype]
    sizes = stored_bytes(work, facts)
    if work.offload == "none":  # nothing is offloaded: every weight stays where it is, on the GPU
        resident = sum(sizes)
    else:
        kept = persisted(facts.param_numels, param_threshold, model_threshold)
        resident = sum(size for size, keep, replaced in zip(sizes, kept, post_quantized(work, facts))
                       if keep and not replaced)
    # The embedding is gathered only outside the decoder layers, where activations are small.
    layer_params = sorted(facts.param_numels)[-2] if len(facts.param_numels) > 1 else max(facts.param_numels)
    live = 0
    if resident < sum(sizes):
        gathered = max(work.live_elements, layer_params)
        live = (int(gathered * work.weight_bytes) + layer_params * nbytes if work.post_quant_modules
                else gathered * nbytes)

    def kv(tokens: int, half_layers_held: int) -> int:
        full = kv_cache_bytes(work.arch, work.batch, tokens, nbytes)
        return min(full, half_layers_held * full // max(1, 2 * _layers(work.arch))) if work.kv_offloaded else full

    prefill = kv(work.prompt_len, 2) + activation_bytes(work.arch, work.batch, work.prompt_len, nbytes)
    decode = kv(work.prompt_len + work.gen_len, 4)
    peak = resident + live + max(prefill, decode) + WORKSPACE_BYTES
    return Residency(param_threshold, model_threshold, resident, peak)


def fits(residency: Residency, budget_bytes: int) -> bool:
    """Whether a residency's predicted peak fits the share of the budget residency is planned against."""
    return residency.predicted_peak_bytes <= budget_bytes * PLAN_FRACTION


def offload_needed(work: Workload, facts: ModelFacts, budget_bytes: int) -> bool:
    """False when every weight plus the workload fits the budget with ``offload=none``: offloading would
    only cost time (each step copies weights the GPU could hold). Post-init quantization loads the weights
    at their dtype's width first, so that is what must fit."""
    if work.post_quant_modules:
        work = replace(work, post_quant_modules=(), weight_bytes=float(DTYPE_BYTES[work.dtype]))
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
    base = predict(work, facts, base_threshold, sys.maxsize)
    if work.post_quant_modules:
        # Post-init quantization replaces the large weights after ZeRO-3 chose what persists, by parameters it
        # never keeps resident: persisting more would only hold their fp16 originals on the GPU while loading.
        return base
    everything = predict(work, facts, max(facts.param_numels), sys.maxsize)
    if fits(everything, budget_bytes):
        return everything
    param_threshold = max(base_threshold, sorted(facts.param_numels)[-2] if len(facts.param_numels) > 1 else 0)
    base_elements = persisted_elements(facts.param_numels, base_threshold, sys.maxsize)
    spare = max(0, int(budget_bytes * PLAN_FRACTION) - base.predicted_peak_bytes)
    return predict(work, facts, param_threshold, base_elements + int(spare / work.weight_bytes))


@dataclass(frozen=True)
class Hardware:
    """The figures of the machine a job is planned for (None: unknown) and the speed model's constants.

    ``host_memory_bytes`` is what a job may use: the available memory when measured here, a preset's total.
    """

    name: str
    device_name: Optional[str]
    gpu_memory_bytes: Optional[int]
    host_memory_bytes: Optional[int]
    h2d_pinned_gbps: Optional[float]
    h2d_pageable_gbps: Optional[float]
    gpu_memory_gbps: Optional[float]
    gpu_tflops: Optional[float]
    stream_efficiency: float
    pageable_efficiency: float
    fetch_overhead_s: float
    param_overhead_s: float
    dequant_overhead_s: float
    post_quant_overhead_s: float
    step_overhead_s: float
    compute_efficiency: float
    memory_efficiency: float
    gpu_count: Optional[int] = None  # GPUs a job may span; None: any number
    gpu_peer_gbps: Optional[float] = None  # GPU-to-GPU GB/s per GPU, one direction

    @property
    def has_gpu_rates(self) -> bool:
        """Whether the speed of a job can be predicted: the link's and the GPU's rates are known."""
        return None not in (self.h2d_pinned_gbps, self.h2d_pageable_gbps, self.gpu_memory_gbps, self.gpu_tflops)


@dataclass(frozen=True)
class Prediction:
    """What a job is predicted to need and to do; the times are None when the hardware's rates are unknown."""

    peak_gpu_bytes: int
    peak_host_bytes: int
    streamed_bytes_per_step: int
    nvme_bytes: int
    decode_step_s: Optional[float]
    prefill_s: Optional[float]
    tokens_per_sec: Optional[float]
    peer_bytes_per_step: int = 0  # bytes each rank all-gathers from its peers per decode step (devices > 1)


def weight_total_bytes(work: Workload, facts: ModelFacts) -> int:
    """Bytes of every weight as stored (quantized width where quantized)."""
    return sum(stored_bytes(work, facts))


def streamed_bytes_per_step(work: Workload, facts: ModelFacts, residency: Residency) -> int:
    """Bytes copied host->device in one decode step: every non-resident weight once (twice for a tied
    embedding the reference settings release between its two uses), plus an offloaded KV cache."""
    streamed = 0
    if work.offload != "none":
        sizes = stored_bytes(work, facts)
        streamed = sum(sizes) - residency.resident_bytes
        if work.refetch_tied:
            streamed += sizes[facts.param_numels.index(max(facts.param_numels))]
    return streamed + offloaded_kv_bytes(work)


def offloaded_kv_bytes(work: Workload) -> int:
    """Bytes of an offloaded KV cache a decode step brings back to the GPU (its mean length); 0 on the GPU."""
    if not work.kv_offloaded:
        return 0
    return kv_cache_bytes(work.arch, work.batch, work.prompt_len + work.gen_len // 2, DTYPE_BYTES[work.dtype])


def pinned_bytes(nbytes: int) -> int:
    """Host bytes a pinned allocation of ``nbytes`` takes: the CUDA host allocator rounds up to a power of two."""
    return 1 << max(0, math.ceil(math.log2(nbytes))) if nbytes > 0 else 0


def host_bytes(work: Workload, facts: ModelFacts) -> int:
    """Predicted peak host RSS of the whole job: per rank the process's base, NVMe staging buffers and an
    offloaded KV cache; the offloaded weights once (ZeRO-3 partitions each parameter across the ranks and each
    pins its own partition, rounded up alone); and a checkpoint read from files. Post-init quantization
    offloads the weights at their dtype's width while loading and their quantized replacements after; the
    host keeps both (measured: OPT-13B int8-post 48.0 GiB pinned)."""
    nbytes = DTYPE_BYTES[work.dtype]
    total = HOST_BASE_BYTES * work.ranks
    if work.offload == "cpu":
        width = nbytes if work.post_quant_modules else work.weight_bytes
        sizes = [int(math.ceil(math.ceil(numel / work.ranks) * width)) for numel in facts.param_numels]
        sizes += [math.ceil(size / work.ranks)
                  for size, replaced in zip(stored_bytes(work, facts), post_quantized(work, facts)) if replaced]
        total += work.ranks * sum(pinned_bytes(size) if work.pin else size for size in sizes)
    elif work.offload == "nvme":
        size = work.nvme_buffer_elements * nbytes
        total += work.ranks * (pinned_bytes(size) if work.pin else size)
    if work.kv_offloaded:
        total += work.ranks * offloaded_kv_host_bytes(work)
    if work.reads_checkpoint:
        total += sum(facts.param_numels) * nbytes
    return total


def offloaded_kv_host_bytes(work: Workload) -> int:
    """Host memory an offloaded KV cache holds: each layer's keys and values go to pinned memory after every
    update, in blocks the CUDA host allocator rounds up to powers of two and caches by size, so every size
    class the sequence passes through stays allocated (OPT-6.7B batch 64, 512 + 8 tokens: 256 MiB blocks
    from the prefill and 512 MiB ones from the decode, 48 GiB for a 17 GB cache)."""
    per_token = kv_cache_bytes(work.arch, work.batch, 1, DTYPE_BYTES[work.dtype]) // (2 * max(1, _layers(work.arch)))
    classes = {pinned_bytes(per_token * tokens) for tokens in range(work.prompt_len, work.prompt_len + work.gen_len + 1)}
    return 2 * _layers(work.arch) * sum(classes)


def quantized_matrices(work: Workload, facts: ModelFacts) -> int:
    """Weight matrices dequantized in every forward under init-time quantization (each one larger than a bias
    or norm); post-init quantization's replaced matrices cost ``post_quant_overhead_s`` instead."""
    if work.weight_bytes >= DTYPE_BYTES[work.dtype] or work.post_quant_modules:
        return 0
    return sum(numel > int(work.arch["hidden_size"]) for numel in facts.param_numels)


def _flops_per_token(work: Workload, facts: ModelFacts, context: int) -> float:
    """Forward FLOPs of one token: two per weight, plus attention over ``context`` earlier tokens."""
    return 2.0 * sum(facts.param_numels) + 4.0 * _layers(work.arch) * context * int(work.arch["hidden_size"])


def streamed_weights(work: Workload, facts: ModelFacts, streamed: int) -> int:
    """The weight bytes among ``streamed`` (an offloaded KV cache's left out)."""
    return streamed - offloaded_kv_bytes(work)


def fetches_per_forward(work: Workload, facts: ModelFacts) -> int:
    """ZeRO-3 fetches (hooked module forwards) per forward pass: one per decoder layer with leaf modules."""
    return facts.modules_with_leaves if work.leaf_modules else facts.modules


def decode_compute_s(work: Workload, facts: ModelFacts, hw: Hardware) -> float:
    """GPU seconds of one decode step: every weight and the KV cache read from GPU memory, and two FLOPs
    per weight and token plus attention, at the GPU's effective rates."""
    context = work.prompt_len + work.gen_len // 2
    kv = kv_cache_bytes(work.arch, work.batch, context, DTYPE_BYTES[work.dtype])
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
    the same weights while it computes ``batch x prompt_len`` tokens; the larger of the two costs it.
    """
    pinned_gbps = hw.h2d_pinned_gbps * hw.stream_efficiency * 1e9
    pinned = work.pin or work.offload == "none"
    gbps = pinned_gbps if pinned else hw.h2d_pageable_gbps * hw.pageable_efficiency * 1e9
    weights = streamed_weights(work, facts, streamed)
    # An offloaded KV cache leaves each layer for (pinned) host memory after its update and comes back before
    # the next step; the two copies serialise with each other but overlap ZeRO-3's weight copies on their own
    # stream (measured: OPT-6.7B batch 64 fully resident, 17.2 GB of cache, 0.84 s a step).
    kv = offloaded_kv_bytes(work)
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
    decode_s = fetch_s + decode_compute_s(work, facts, hw) + hw.step_overhead_s
    compute_s = prefill_flops(work, facts) / (hw.gpu_tflops * 1e12 * hw.compute_efficiency)
    prefill_s = max(fetch_s, compute_s) + hw.step_overhead_s
    return prefill_s, decode_s


def tokens_per_sec(batch: int, gen_len: int, prefill_s: float, decode_step_s: float) -> float:
    """The ``tokens_per_sec`` metric's definition: generated tokens over prefill plus every decode step."""
    return batch * gen_len / (prefill_s + (gen_len - 1) * decode_step_s)


def predict_job(work: Workload, facts: ModelFacts, residency: Residency, hw: Hardware) -> Prediction:
    """Everything predicted of one job: memory from ``residency`` (GPU peak and streamed bytes per rank, host
    memory of the whole job), speed when ``hw`` has its rates (and its peer rate, for more than one rank);
    tokens/s counts every rank's batch."""
    streamed, peer = rank_traffic(work, facts, streamed_bytes_per_step(work, facts, residency))
    nvme = weight_total_bytes(work, facts) if work.offload == "nvme" else 0
    prefill_s = decode_s = speed = None
    if hw.has_gpu_rates and (not peer or hw.gpu_peer_gbps is not None):
        prefill_s, decode_s = predict_times(work, facts, streamed, hw, peer_bytes=peer)
        speed = tokens_per_sec(work.batch * work.ranks, work.gen_len, prefill_s, decode_s)
    return Prediction(peak_gpu_bytes=residency.predicted_peak_bytes, peak_host_bytes=host_bytes(work, facts),
                      streamed_bytes_per_step=streamed, nvme_bytes=nvme, decode_step_s=decode_s,
                      prefill_s=prefill_s, tokens_per_sec=speed, peer_bytes_per_step=peer)


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
