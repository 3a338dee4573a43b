"""A job's workload: the shapes, storage widths and streaming settings its predictions depend on, taken
from its spec once. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from zi_app.config.schema import AioSpec, JobSpec, ModelShape

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NVME_BUFFER_COUNT = 5  # offload_param.buffer_count when memory.offload.buffer_count is null (the reference's)
NVME_MIN_AIO_BYTES = 2**20  # DeepSpeed swaps a partition to NVMe only from max(this, aio.block_size) bytes
NVME_ALIGNED_BYTES = 1024  # ... into a file padded to a multiple of this times aio.intra_op_parallelism


@dataclass(frozen=True)
class Workload:
    """The shapes and storage widths that decide a job's memory."""

    shape: ModelShape
    dtype: str
    weight_bytes: float  # bytes per stored weight element (less than the dtype's when quantized)
    batch: int
    prompt_len: int
    gen_len: int
    live_elements: int  # stage3_max_live_parameters
    offload: str = "cpu"  # offload_param.device: none, cpu or nvme
    pin: bool = True
    kv_offloaded: bool = False  # the KV cache lives in host memory (kvcache=cpu or cpu_transformers)
    kv_preallocated: bool = False  # ... in one buffer of its final length (kvcache=cpu: zi_app/run/kvcache.py)
    kv_attend_on_host: bool = False  # ... where decode steps attend over it on the CPU (kvcache.attention=host)
    kv_bits: int = 16  # ... held quantized to 8 or 4 bits per element (kvcache.quant); 16: in the model's dtype
    kv_gpu_layers: int = 0  # ... but for this many layers', kept in GPU memory (kvcache.gpu_layers, as planned)
    kv_fused_dequant: bool = False  # ... dequantized on the GPU by one Triton kernel (kvcache.dequant=triton)
    leaf_modules: bool = False
    refetch_tied: bool = False  # a tied embedding / LM head is fetched twice per step
    reads_checkpoint: bool = False  # weights come from files (mapped into host memory while loading)
    checkpoint_file_bytes: Optional[int] = None  # the largest of those files, when they load one by one
    nvme_buffer_elements: int = 0  # offload_param.buffer_count * buffer_size (NVMe offload)
    nvme_min_bytes: int = 0  # a partition this size or larger swaps to NVMe; smaller ones stay in host memory
    nvme_alignment: int = 1  # bytes each swap file is padded to a multiple of
    # memory.fetch=overlap: the host's per-fetch work runs while copies are in flight, and no hooks remain
    # when every weight is resident (zi_app/run/fetch.py)
    overlap_fetch: bool = False
    post_quant_modules: Tuple[str, ...] = ()  # weight_quantization.post_init_quant's keys (quant=int8-post/int4-post)
    ranks: int = 1  # processes (devices) one job spans; batch is per rank
    pin_exact: bool = False  # pinned partitions at their own size (memory.pin_backend=native), not a power of two
    # DeepSpeed's CPU accelerator: what a GPU would hold (KV cache, activations, gathered weights) is host memory
    on_cpu: bool = False
    # ... where Triton is installed, which torch's compiler stack then imports while the model loads
    imports_triton: bool = False


def persistence_threshold(word: str, h: int) -> int:
    """stage3_param_persistence_threshold for a fixed ``memory.persistence`` setting.

    ``h``: the reference (only biases and norms stay resident); ``hh``: h*h+1, so every h x h
    projection (attention q/k/v/out) stays resident on the GPU too; digits: that many elements.
    ``auto`` is planned against the GPU budget (:func:`zi_app.plan.job.plan_job`); without a known budget it
    falls back to ``h``.
    """
    if word in ("h", "auto"):
        return h
    if word == "hh":
        return h * h + 1
    return int(word)


def weight_bytes(spec: JobSpec) -> float:
    """Bytes per stored weight element: the dtype's, or the quantized width plus a scale and zero point per group."""
    if spec.quant.mode == "none":
        return float(DTYPE_BYTES[spec.model.dtype])
    return spec.quant.bits / 8 + 2 * DTYPE_BYTES[spec.model.dtype] / spec.quant.group_size


def budget_bytes(spec: JobSpec, device_bytes: Optional[int]) -> Optional[int]:
    """The GPU memory a job may use: ``memory.gpu_budget_gib`` if set, else the whole device (when known)."""
    if spec.memory.gpu_budget_gib is not None:
        return int(spec.memory.gpu_budget_gib * 2**30)
    return device_bytes


def nvme_buffer_size(spec: JobSpec) -> int:
    """offload_param.buffer_size in elements: as set, else the largest parameter (each buffer must hold one)."""
    return spec.offload.buffer_size or spec.model.shape.largest_parameter_numel


def workload(spec: JobSpec) -> Workload:
    """The shapes, storage widths and streaming settings of ``spec`` that its predictions depend on."""
    shape, memory, offload = spec.model.shape, spec.memory, spec.offload
    aio = offload.aio or AioSpec()
    h = shape.hidden_size
    return Workload(shape=shape, dtype=spec.model.dtype, weight_bytes=weight_bytes(spec),
                    batch=spec.batch, prompt_len=spec.prompt_len, gen_len=spec.gen_len,
                    live_elements=int(memory.max_live_hh * h * h), offload=offload.device, pin=spec.pin,
                    kv_offloaded=spec.kvcache.cache_implementation in ("host", "offloaded"),
                    kv_preallocated=spec.kvcache.cache_implementation == "host",
                    kv_attend_on_host=spec.kvcache.attends_on_host, kv_bits=spec.kvcache.bits,
                    kv_gpu_layers=0 if spec.kvcache.gpu_layers == "auto" else spec.kvcache.planned_gpu_layers,
                    kv_fused_dequant=spec.kvcache.dequant == "triton",
                    leaf_modules=memory.leaf_modules,
                    # measured: only the reference's small buckets release the embedding between its two uses
                    refetch_tied=shape.tied_embeddings and not memory.leaf_modules
                    and memory.max_reuse_distance != "model",
                    reads_checkpoint=spec.model.weights == "pretrained",
                    checkpoint_file_bytes=spec.model.largest_file_bytes if spec.model.loader == "files" else None,
                    nvme_buffer_elements=((offload.buffer_count or NVME_BUFFER_COUNT) * nvme_buffer_size(spec)
                                          if offload.device == "nvme" else 0),
                    nvme_min_bytes=max(NVME_MIN_AIO_BYTES, aio.block_size) if offload.device == "nvme" else 0,
                    nvme_alignment=NVME_ALIGNED_BYTES * aio.intra_op_parallelism if offload.device == "nvme" else 1,
                    overlap_fetch=memory.fetch == "overlap",
                    post_quant_modules=(spec.quant.modules or ()) if spec.quant.mode == "post" else (),
                    ranks=spec.devices, pin_exact=spec.memory.pin_backend == "native")
