"""Predicted memory of a job: what ZeRO-3 keeps resident on the GPU and the peak it reaches there, and the
host memory the job holds. Pure arithmetic on the workload and the model's facts.

GPU memory: what lives on the GPU at the peak of the job: resident (persistent) weights + KV cache +
prefill activations + gathered (live) parameters + a fixed allowance for CUDA/cuBLAS workspaces.
Host memory: the process's base + every offloaded weight (pinned buffers rounded up to powers of two).
A job of several ranks (``devices``) holds the resident weights on every rank and partitions the offloaded
ones. docs/planner.md derives each term and its constants from measured runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

from zi_app.config.checks import KV_QUANT_CHUNK_TOKENS, kv_quant_group
from zi_app.config.schema import ModelShape
from zi_app.plan.facts import ModelFacts
from zi_app.plan.workload import DTYPE_BYTES, Workload

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
# The same on DeepSpeed's CPU accelerator, where no CUDA context is made: the job's RSS just before loading
# (host_rss_before_load_bytes, 0.565 GiB for every model on the 2-core CI machine).
HOST_BASE_CPU_BYTES = int(0.565 * 2**30)
# What importing Triton adds to it: torch._dynamo, imported while the model loads, imports Triton where it is
# installed (the test extras install it for kvcache.dequant=triton). Measured on the CPU accelerator, fresh
# interpreters with and without Triton importable: 0.07 GiB more at load and at the peak, tiny-opt and opt-1.3b alike.
# GPU machines always have it (PyTorch's CUDA wheels bring it): HOST_BASE_BYTES was measured with it.
TRITON_IMPORT_BYTES = int(0.07 * 2**30)


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


def kv_cache_bytes(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``seq_len`` tokens."""
    return 2 * shape.layers * batch * seq_len * shape.kv_dim * dtype_bytes


def stored_kv_parts(work: Workload, nbytes: int) -> Tuple[int, int]:
    """(values, scales): the bytes our host cache stores for ``nbytes`` of keys and values in the model's dtype.
    With kvcache.quant=none the values themselves and no scales; quantized, ``kv_bits`` per element and each
    group's minimum and step in the dtype (zi_app/run/kvcache.py)."""
    if work.kv_bits >= 16:
        return nbytes, 0
    width = DTYPE_BYTES[work.dtype]
    elements = nbytes // width
    group = kv_quant_group(work.shape.hidden_size // work.shape.heads)
    return elements * work.kv_bits // 8, elements // group * 2 * width


def streamed_kv_share(work: Workload, nbytes: int) -> int:
    """The part of ``nbytes`` (spread evenly over the layers) that belongs to layers whose cache is in host
    memory: all of it but the ``kv_gpu_layers`` kept on the GPU."""
    layers = max(1, work.shape.layers)
    return nbytes * (layers - work.kv_gpu_layers) // layers


def kept_kv_bytes(work: Workload) -> int:
    """GPU bytes of the layers' caches kept there (kvcache.gpu_layers): at the final length, stored as the host
    stores them."""
    final = kv_cache_bytes(work.shape, work.batch, work.prompt_len + work.gen_len, DTYPE_BYTES[work.dtype])
    return stored_kv_bytes(work, final // max(1, work.shape.layers) * work.kv_gpu_layers)


def stored_kv_bytes(work: Workload, nbytes: int) -> int:
    """Bytes our host cache stores for ``nbytes`` of keys and values in the model's dtype (:func:`stored_kv_parts`)."""
    return sum(stored_kv_parts(work, nbytes))


def activation_bytes(shape: ModelShape, batch: int, prompt_len: int, dtype_bytes: int) -> int:
    """Peak transient activations of the prefill, inside one layer's MLP: the residual and normalised hidden
    states and the MLP's intermediate before and after its activation function, for every prompt token; a gated
    MLP holds a third, its product with the up projection (Llama-2-70B int4 batch 16: measured 0.3-0.4 GiB
    above the two-intermediate count, one intermediate is 0.44 GiB)."""
    intermediates = 3 if shape.gated_mlp else 2
    return batch * prompt_len * (2 * shape.hidden_size + intermediates * shape.ffn_dim) * dtype_bytes


def projection_bytes(shape: ModelShape, batch: int, prompt_len: int, dtype_bytes: int) -> int:
    """Activations of the prefill while a layer's attention begins: the residual and normalised hidden states,
    and the queries, keys and values projected from them, for every prompt token."""
    return batch * prompt_len * (3 * shape.hidden_size + 2 * shape.kv_dim) * dtype_bytes


def scores_bytes(work: Workload) -> int:
    """Transient bytes of the prefill's attention beyond :func:`projection_bytes` in a model that writes its
    attention out (``eager_attention``, BLOOM's): every head's scores, their masked copy and their float32
    softmax; either the softmax's input converted to float32 or its output's copy back in the dtype (ATen fuses
    that conversion into the softmax for float16 on a GPU only); the previous layer's probabilities in the dtype,
    which transformers' layer loop holds until the next layer returns; and the per-head copies of the queries,
    keys and values. 0 where attention runs through SDPA, which never holds the scores. Per score that is 12
    bytes in float16 on a GPU, 14 in bfloat16 or in float16 on a CPU, 16 in float32 (measured within 2% on a CPU:
    benchmarks/attention_scores_memory.py); BLOOM-176B int4 float16 batch 48 under 48 GiB ran out of memory asking
    for the float32 softmax's 5.25 GiB with 42.86 GiB allocated, in a plan that counted only the MLP's
    activations."""
    shape, nbytes = work.shape, DTYPE_BYTES[work.dtype]
    if not shape.eager_attention:
        return 0
    converted = nbytes if work.dtype == "float16" and not work.on_cpu else 4 if nbytes < 4 else 0
    previous = nbytes if shape.layers > 1 else 0
    scores = work.batch * shape.heads * work.prompt_len ** 2
    return (scores * (2 * nbytes + 4 + converted + previous)
            + work.batch * work.prompt_len * 3 * shape.hidden_size * nbytes)


def post_quantized(work: Workload, facts: ModelFacts) -> Tuple[bool, ...]:
    """Which parameters post-init quantization replaces: the weight of each Linear or Embedding module whose
    name contains one of its keys (DeepSpeed's own matching)."""
    names = facts.weight_modules or ("",) * len(facts.param_numels)
    return tuple(bool(name) and any(key in name for key in work.post_quant_modules) for name in names)


def init_quantized(work: Workload, facts: ModelFacts) -> Tuple[bool, ...]:
    """Which parameters init-time quantization packs as zero.Init takes them: the weight of each module of
    exactly the type Linear or Embedding (DeepSpeed 0.19.8's WEIGHT_QUANTIZATION_LAYERS; not OPT's learned
    position embedding, a subclass), none without it. Biases and norms stay at the dtype's width."""
    if work.post_quant_modules or work.weight_bytes >= DTYPE_BYTES[work.dtype]:
        return (False,) * len(facts.param_numels)
    names = facts.weight_modules or ("",) * len(facts.param_numels)
    return tuple(bool(name) for name in names)


def stored_bytes(work: Workload, facts: ModelFacts) -> Tuple[int, ...]:
    """Each parameter's bytes between steps: the quantized width for the weights init-time quantization
    packs and for the ones post-init quantization replaces, the dtype's for the rest."""
    nbytes = DTYPE_BYTES[work.dtype]  # at most one of the two kinds of quantization applies
    packed = (init or post for init, post in zip(init_quantized(work, facts), post_quantized(work, facts)))
    return tuple(int(numel * (work.weight_bytes if quantized else nbytes))
                 for numel, quantized in zip(facts.param_numels, packed))


def deepspeed_numels(work: Workload, facts: ModelFacts) -> Tuple[int, ...]:
    """Each parameter's size as ZeRO-3 compares it with its persistence thresholds (``ds_numel``): a weight
    packed by init-time quantization is its packed bytes (scales included) viewed in the model's dtype,
    about ``weight_bytes / dtype bytes`` of its elements (int4 fp16: 0.28). Counting the unpacked elements
    planned 3.6x fewer resident weights than ZeRO-3 then kept (OPT-66B and OPT-175B int4 ran out of memory)."""
    nbytes = DTYPE_BYTES[work.dtype]
    return tuple(math.ceil(numel * work.weight_bytes / nbytes) if packed else numel
                 for numel, packed in zip(facts.param_numels, init_quantized(work, facts)))


def predict(work: Workload, facts: ModelFacts, param_threshold: int, model_threshold: int) -> Residency:
    """Predicted peak GPU bytes allocated by one job with these persistence thresholds.

    The peak is the larger of the prefill's (KV cache of the prompt + a layer's activations for every
    prompt token) and the last decode step's (KV cache of the whole sequence), each with the resident
    weights, the gathered (live) parameters of a layer when any weight is streamed, and a fixed workspace.
    transformers' offloaded KV cache holds two layers on the GPU in a decode step (the one computing and the one
    prefetched) and one in the prefill (the one computing: nothing is prefetched yet); ours (kvcache=cpu) two
    slots of one layer at the final length throughout, and a copy of the computing layer's in attention's
    layout. Post-init quantization replaces its weights by new parameters ZeRO-3 never persists: they are
    streamed at their quantized width and dequantized one matrix at a time.
    """
    nbytes = DTYPE_BYTES[work.dtype]
    sizes = stored_bytes(work, facts)
    if work.offload == "none":  # nothing is offloaded: every weight stays where it is, on the GPU
        resident = sum(sizes)
    else:
        kept = persisted(deepspeed_numels(work, facts), param_threshold, model_threshold)
        resident = sum(size for size, keep, replaced in zip(sizes, kept, post_quantized(work, facts))
                       if keep and not replaced)
    # The embedding is gathered only outside the decoder layers, where activations are small.
    layer_params = sorted(facts.param_numels)[-2] if len(facts.param_numels) > 1 else max(facts.param_numels)
    live = 0
    if resident < sum(sizes):
        gathered = max(work.live_elements, layer_params)
        live = (int(gathered * work.weight_bytes) + layer_params * nbytes if work.post_quant_modules
                else gathered * nbytes)

    final = work.prompt_len + work.gen_len

    layers = max(1, work.shape.layers)

    def kv(prefill: bool) -> Tuple[int, int]:
        """(bytes of KV cache held through a layer, bytes that live only while its cache updates), in the
        prefill or the last decode step."""
        tokens, half_layers_held = (work.prompt_len, 2) if prefill else (final, 4)
        if work.kv_attend_on_host:  # the prefill attends over one layer's prompt keys and values on the GPU, and
            # sends them to the host padded to the final length (kvcache.py)
            return (kv_cache_bytes(work.shape, work.batch, work.prompt_len, nbytes) // layers,
                    kv_cache_bytes(work.shape, work.batch, final, nbytes) // layers)
        streams = work.kv_gpu_layers < layers  # some layer's cache crosses the link: the slots are made
        if work.kv_preallocated:  # two slots of one layer at the final length, made at the first update, and
            # the computing layer's keys and values in attention's layout
            tokens, half_layers_held = final, 6 if streams else 2
        full = kv_cache_bytes(work.shape, work.batch, tokens, nbytes)
        if not work.kv_offloaded:
            return full, 0
        held = min(full, half_layers_held * full // (2 * layers)) + kept_kv_bytes(work)
        if not (work.kv_preallocated and work.kv_bits < 16):
            return held, 0
        # Quantized, each slot's room for a layer's packed prefix; 64 tokens at a time, the prefill quantizes the
        # prompt (a float32 copy and its differences: four times the chunk's bytes in the dtype) and a decode step
        # dequantizes the prefix (the unpacked codes and their dtype copy: one and a half times)
        chunk = kv_cache_bytes(work.shape, work.batch, min(tokens, KV_QUANT_CHUNK_TOKENS), nbytes) // layers
        held += 2 * stored_kv_bytes(work, full) // layers * streams
        return held, 4 * chunk if prefill else 3 * chunk // 2

    # A cache update's transient buffers live before the layer's attention, beside the prompt's projections,
    # not with the MLP's intermediates where the prefill's activations peak (OPT-30B int4 KV batch 256: planned
    # as coexisting, 2.2 GiB above the measured peak).
    prefill_held, prefill_update = kv(prefill=True)
    prefill = prefill_held + max(activation_bytes(work.shape, work.batch, work.prompt_len, nbytes),
                                 projection_bytes(work.shape, work.batch, work.prompt_len, nbytes)
                                 + max(prefill_update, scores_bytes(work)))
    decode_held, decode_update = kv(prefill=False)
    decode = decode_held + decode_update
    # The logits come after the last layer has let go of its activations, beside the KV cache held. With DeepSpeed's
    # fetch the layers' weights are gone by then; with ours (memory.fetch=overlap) a live set of them is still
    # there (BLOOM-176B int4 streamed: 9.8 and 12.5 GiB above a plan without the head; 0.6-1.0 for OPT-175B), most
    # likely the next step's first fetches, which it issues at once: not profiled.
    head = lm_head_bytes(work, facts, sizes, resident < sum(sizes)) + decode_held + live * work.overlap_fetch
    peak = resident + max(live + max(prefill, decode), head) + WORKSPACE_BYTES
    return Residency(param_threshold, model_threshold, resident, peak)


def lm_head_bytes(work: Workload, facts: ModelFacts, sizes: Sequence[int], streamed: bool) -> int:
    """GPU bytes live while the largest quantized weight (the word embedding tied to the LM head, or the LM head)
    is dequantized for the logits: its stored bytes where it is streamed, its copy at the dtype's width and, on
    DeepSpeed's pure-PyTorch path (any dtype but float16: its dequantization kernel is fp16-only), int4's codes
    unpacked to a byte each. BLOOM-176B int4 in bfloat16: 3.6 billion elements, 11.9 GiB, which the plan left
    out (peaks 9.8-9.9 GiB above it, 2026-12-05 and 12-06). Nothing for weights at their dtype's width, nor on
    DeepSpeed's CPU accelerator, whose term holds the embedding at full width (:func:`cpu_device_bytes`). ``sizes``:
    each parameter's stored bytes (:func:`stored_bytes`)."""
    nbytes = DTYPE_BYTES[work.dtype]
    quantized = [numel for numel, size in zip(facts.param_numels, sizes) if size < numel * nbytes]
    if work.on_cpu or not quantized:
        return 0
    numel = max(quantized)
    unpacked = numel if pytorch_dequantization(work) and work.weight_bytes < 1 else 0
    return int(numel * work.weight_bytes) * streamed + numel * nbytes + unpacked


def pytorch_dequantization(work: Workload) -> bool:
    """Whether DeepSpeed (0.19.8) dequantizes this job's quantized weights on the GPU with its pure-PyTorch path
    instead of its kernel, which serves float16 only: every weight is unpacked, copied, divided and shifted by
    separate kernels each step (BLOOM-176B int4 in bfloat16: a decode step 1.85x its roofline)."""
    return work.weight_bytes < DTYPE_BYTES[work.dtype] and work.dtype != "float16" and not work.on_cpu


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
    ZeRO-3's per-module hooks are removed (zi_app/run/fetch.py).
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
    numels = deepspeed_numels(work, facts)
    everything = predict(work, facts, max(numels), sys.maxsize)
    if fits(everything, budget_bytes):
        return everything
    param_threshold = max(base_threshold, sorted(numels)[-2] if len(numels) > 1 else 0)
    base_elements = persisted_elements(numels, base_threshold, sys.maxsize)
    spare = max(0, int(budget_bytes * PLAN_FRACTION) - base.predicted_peak_bytes)
    # ZeRO-3's elements are the dtype's width, packed or not (deepspeed_numels).
    return predict(work, facts, param_threshold, base_elements + spare // DTYPE_BYTES[work.dtype])


def plan_kv_gpu_layers(work: Workload, facts: ModelFacts, residency: Residency, budget_bytes: int) -> int:
    """kvcache.gpu_layers=auto: how many layers' caches the GPU budget holds beside ``residency`` (planned with
    none kept), once every weight is resident. Weights come first: a kept weight saves its link time and the host
    its fetch, a kept quantized cache saves its link time but is dequantized on the GPU every step (whether that
    pays is the speed prediction's to say: zi_app/plan/job.py)."""
    if not (work.kv_preallocated and not work.kv_attend_on_host) or residency.resident_bytes < weight_total_bytes(
            work, facts):
        return 0
    per_layer = kept_kv_bytes(replace(work, kv_gpu_layers=1))
    spare = int(budget_bytes * PLAN_FRACTION) - residency.predicted_peak_bytes
    return max(0, min(work.shape.layers, spare // max(1, per_layer)))


def partition_bytes(work: Workload, facts: ModelFacts) -> Tuple[int, ...]:
    """Each parameter's partition on one rank, as stored: ZeRO-3 splits every parameter across the ranks."""
    return tuple(math.ceil(size / work.ranks) for size in stored_bytes(work, facts))


def nvme_bytes(work: Workload, facts: ModelFacts) -> int:
    """Disk the weights swapped to NVMe take, every rank's: each partition of at least ``work.nvme_min_bytes``
    in its own file padded to ``work.nvme_alignment``; smaller ones stay in host memory (:func:`host_parts`)."""
    if work.offload != "nvme":
        return 0
    return work.ranks * sum(round_up(size, work.nvme_alignment) for size in partition_bytes(work, facts)
                            if size >= work.nvme_min_bytes)


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
    """Bytes of an offloaded KV cache a decode step brings back to the GPU, on average; 0 on the GPU: the cached
    tokens it reads (:func:`cached_kv_bytes`), or where the host attends over them (kvcache.attention=host) each
    layer's attention output, one token of every query head."""
    if not work.kv_offloaded:
        return 0
    if work.kv_attend_on_host:
        return work.shape.layers * work.batch * work.shape.hidden_size * DTYPE_BYTES[work.dtype]
    if work.kv_preallocated:
        return streamed_kv_share(work, stored_kv_bytes(work, cached_kv_bytes(work)))
    return cached_kv_bytes(work)


def cached_kv_bytes(work: Workload) -> int:
    """Bytes of cached keys and values a decode step's attention reads, on average. Decode step ``t`` (1 to
    gen_len - 1: the prefill makes the first token) reads every layer's ``prompt_len + t - 1`` cached tokens;
    the new tokens' keys and values are made on the GPU."""
    steps = max(1, work.gen_len - 1)
    per_token = kv_cache_bytes(work.shape, work.batch, 1, DTYPE_BYTES[work.dtype])
    return per_token * (work.prompt_len + (steps - 1) // 2) + per_token * ((steps - 1) % 2) // 2


def pinned_bytes(nbytes: int) -> int:
    """Host bytes a pinned allocation of ``nbytes`` takes: the CUDA host allocator rounds up to a power of two."""
    return 1 << max(0, math.ceil(math.log2(nbytes))) if nbytes > 0 else 0


PAGE_BYTES = 4096


def round_up(nbytes: int, multiple: int) -> int:
    """``nbytes`` rounded up to a multiple of ``multiple``."""
    return -(-nbytes // multiple) * multiple


def locked_bytes(nbytes: int) -> int:
    """Host bytes a page-locked allocation of ``nbytes`` takes (memory.pin_backend=native): whole pages."""
    return round_up(nbytes, PAGE_BYTES)


def partition_host_bytes(work: Workload, nbytes: int) -> int:
    """Host bytes an offloaded partition of ``nbytes`` takes: pageable as it is, pinned by torch's allocator
    rounded up to a power of two, page-locked by DeepSpeed's native backend to whole pages."""
    if not work.pin:
        return nbytes
    return locked_bytes(nbytes) if work.pin_exact else pinned_bytes(nbytes)


def host_parts(work: Workload, facts: ModelFacts, residency: Residency) -> Dict[str, int]:
    """Predicted peak host RSS of the whole job, by what holds it (names as ``zi-plan`` and refusals show them):
    per rank the process's base, NVMe staging buffers (and the partitions too small to swap) and an offloaded KV
    cache (its bytes at the final length, and what transformers' cache keeps beyond them in size classes); the
    offloaded weights once (ZeRO-3 partitions each parameter across the ranks and each pins its own partition,
    rounded up alone: the pinning round-up); and a checkpoint read from files (its largest file; optimistic where
    transformers keeps every file mapped until the last module loads, docs/planner.md). Post-init quantization
    offloads the weights at their dtype's width while loading and their quantized replacements after; the host
    keeps both (measured: OPT-13B int8-post 48.0 GiB pinned). On the CPU accelerator (``work.on_cpu``) each rank's
    "device" is host memory too: the ``residency``'s peak (resident and gathered weights, KV cache, activations) is
    added per rank."""
    nbytes = DTYPE_BYTES[work.dtype]
    base = HOST_BASE_CPU_BYTES + TRITON_IMPORT_BYTES * work.imports_triton if work.on_cpu else HOST_BASE_BYTES
    parts = {"process base": base * work.ranks}
    if work.offload == "cpu":
        sizes = [int(math.ceil(math.ceil(numel / work.ranks) * (work.weight_bytes if packed else nbytes)))
                 for numel, packed in zip(facts.param_numels, init_quantized(work, facts))]
        sizes += [size for size, replaced in zip(partition_bytes(work, facts), post_quantized(work, facts)) if replaced]
        parts["offloaded weights"] = work.ranks * sum(sizes)
        parts["pinning round-up"] = work.ranks * sum(partition_host_bytes(work, size) - size for size in sizes)
    elif work.offload == "nvme":
        size = work.nvme_buffer_elements * nbytes
        parts["NVMe staging buffers"] = work.ranks * (pinned_bytes(size) if work.pin else size)
        parts["weights too small to swap"] = work.ranks * sum(
            size for size in partition_bytes(work, facts) if size < work.nvme_min_bytes)
    if work.kv_offloaded:
        final = streamed_kv_share(work, stored_kv_bytes(
            work, kv_cache_bytes(work.shape, work.batch, work.prompt_len + work.gen_len, nbytes)))
        parts["KV cache"] = work.ranks * final
        parts["KV size classes"] = work.ranks * (offloaded_kv_host_bytes(work) - final)
    if work.reads_checkpoint:  # its largest file where its files are known, else the whole checkpoint
        parts["checkpoint read"] = work.checkpoint_file_bytes or sum(facts.param_numels) * nbytes
    if work.on_cpu:
        parts["CPU device memory"] = work.ranks * cpu_device_bytes(work, facts, residency)
    return parts


def cpu_device_bytes(work: Workload, facts: ModelFacts, residency: Residency) -> int:
    """What one rank's "device" holds at its peak on DeepSpeed's CPU accelerator, where it is host memory: the
    GPU's terms (:func:`predict`) less CUDA's workspaces, and beside the gathered bucket the embedding at its
    dtype's width (tied to the LM head, it stays gathered through the step) and the layer computing while the
    bucket's are fetched. Fitted on opt-1.3b's width (0.58 GiB for 2 or 8 layers, int4, int8 or none, batch 2
    or 8) and tiny-opt: tests/run/test_host_memory.py."""
    gathered = 0
    if residency.resident_bytes < weight_total_bytes(work, facts):
        numels = sorted(facts.param_numels)
        gathered = (numels[-1] + (numels[-2] if len(numels) > 1 else 0)) * DTYPE_BYTES[work.dtype]
    return residency.predicted_peak_bytes - WORKSPACE_BYTES + gathered


def host_bytes(work: Workload, facts: ModelFacts, residency: Residency) -> int:
    """Predicted peak host RSS of the whole job: the sum of :func:`host_parts`."""
    return sum(host_parts(work, facts, residency).values())


def offloaded_kv_host_bytes(work: Workload) -> int:
    """Host memory an offloaded KV cache holds. Ours (kvcache=cpu, ``kv_preallocated``): the cache at its final
    length, once, page-locked to whole pages when pinned. transformers' (kvcache=cpu_transformers): each layer's
    keys and values go to pinned memory after every update, in blocks the CUDA host allocator rounds up to
    powers of two and caches by size, so every size class the sequence passes through stays allocated
    (OPT-6.7B batch 64, 512 + 8 tokens: 256 MiB blocks from the prefill and 512 MiB ones from the decode,
    48 GiB for a 17 GB cache)."""
    if work.kv_preallocated:
        final = kv_cache_bytes(work.shape, work.batch, work.prompt_len + work.gen_len, DTYPE_BYTES[work.dtype])
        # one buffer each (the streamed layers'), locked on its own
        parts = [streamed_kv_share(work, part) for part in stored_kv_parts(work, final)]
        return sum(locked_bytes(part) for part in parts) if work.pin else sum(parts)
    per_token = kv_cache_bytes(work.shape, work.batch, 1, DTYPE_BYTES[work.dtype]) // (2 * max(1, work.shape.layers))
    classes = {pinned_bytes(per_token * tokens) for tokens in range(work.prompt_len, work.prompt_len + work.gen_len + 1)}
    return 2 * work.shape.layers * sum(classes)
