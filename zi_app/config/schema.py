"""The typed schema of a ZeRO-Inference job: frozen spec dataclasses, and their Hydra twins in ConfigStore.

The ``*Spec`` classes are the one definition of every key: :func:`zi_app.config.spec.validate` turns a
composed config into a :class:`JobSpec`, and every stage below takes that. Hydra must merge YAML groups and
overrides into its schema nodes, and OmegaConf makes every node of a frozen dataclass read-only, so the
schema registered as ``zi_schema`` is a mutable twin generated from the specs (``ZIConfig`` and its nested
``*Config`` classes): composition rejects unknown keys and wrong types (``batch=abc``) with the key's name
without a second list of fields to keep in step. Cheap to import.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DERIVED = "derived"  # field metadata: set by validation, not a key of the composed config


class FrozenDict(dict):
    """A dict that refuses changes: a spec's architecture and other free-form blocks."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a job spec is frozen; build a new one with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self):
        # Pickled into rank processes: rebuild from the items instead of setting them one by one.
        return type(self), (dict(self),)


def freeze(value: Any) -> Any:
    """``value`` with every dict made a :class:`FrozenDict` and every list a tuple, all the way down."""
    if isinstance(value, dict):
        return FrozenDict({key: freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable copy of a frozen value (what transformers' config classes and YAML writers take)."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


@dataclass(frozen=True)
class ModelShape:
    """The model's sizes, read once from its architecture (each family's key names) by validation."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    ffn_dim: int  # the MLP's intermediate width
    vocab_size: int
    embed_dim: int  # the embedding's width (OPT's word_embed_proj_dim, else hidden_size)
    max_positions: Optional[int]  # learned or rotary position limit; None where the config has none
    tied_embeddings: bool  # the LM head is the embedding
    gated_mlp: bool = False  # the MLP is act(gate(x)) * up(x) (Llama's): three intermediates live at once, not two
    # attention written out in PyTorch ops (BLOOM's ALiBi attention), not SDPA: the prefill holds every head's scores
    eager_attention: bool = False

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys (or values) in one layer: fewer heads than queries under GQA."""
        return self.hidden_size * self.kv_heads // self.heads

    @property
    def largest_parameter_numel(self) -> int:
        """Elements in the largest weight: the embedding/LM head, an MLP projection or a learned position
        table (OPT's has max_positions + 2 rows; an upper bound for models without one)."""
        positions = (self.max_positions or 0) + 2
        return max(self.vocab_size * self.embed_dim, self.hidden_size * self.ffn_dim, positions * self.hidden_size)


@dataclass(frozen=True)
class ModelSpec:
    name: str = "unnamed"  # the preset's name (runs and result lines show it)
    path: Optional[str] = None  # checkpoint directory or hub id for from_pretrained (model.weights=pretrained)
    weights: str = "random"  # random: seeded init, no checkpoint; pretrained: from_pretrained(path)
    # pretrained weights: files (one checkpoint file at a time into the ZeRO-3 partitions), transformers
    # (from_pretrained: every file mapped until the last module loads), auto: files for a local directory
    loader: str = "auto"
    dtype: str = "float16"  # float32, float16 or bfloat16 (fp32/fp16/half/bf16 accepted): fp16/bf16 in ds_config
    max_positions: Optional[int] = None  # prompt_len + gen_len limit; the architecture's own when null
    arch: Mapping[str, Any] = field(default_factory=FrozenDict)  # the transformers config dict (model_type, sizes)
    shape: Optional[ModelShape] = field(default=None, metadata={DERIVED: True})  # sizes read from arch
    # the largest weight file of a local checkpoint (pretrained); None: random weights, or files not local
    largest_file_bytes: Optional[int] = field(default=None, metadata={DERIVED: True})


@dataclass(frozen=True)
class AioSpec:
    block_size: int = 16 * 2**20  # aio.block_size: bytes per NVMe read/write request
    queue_depth: int = 64  # aio.queue_depth: requests in flight
    intra_op_parallelism: int = 8  # aio.intra_op_parallelism (thread_count before DeepSpeed 0.16.4)
    single_submit: bool = False  # aio.single_submit: submit requests one by one
    overlap_events: bool = True  # aio.overlap_events: overlap submission and completion
    use_gds: bool = False  # aio.use_gds: NVIDIA GPUDirect Storage


@dataclass(frozen=True)
class OffloadSpec:
    device: str = "none"  # offload_param.device: none (weights on the GPU), cpu or nvme
    nvme_path: Optional[str] = None  # offload_param.nvme_path: the swap directory (nvme only)
    buffer_count: Optional[int] = None  # offload_param.buffer_count (nvme; 5 when null)
    buffer_size: Optional[int] = None  # offload_param.buffer_size in elements (nvme; the largest parameter when null)
    aio: Optional[AioSpec] = None  # the aio block (nvme only)


@dataclass(frozen=True)
class QuantSpec:
    mode: str = "none"  # none; init: quantized_initialization inside zero.Init; post: post_init_quant per module
    bits: Optional[int] = None  # num_bits: 4 or 8
    group_size: Optional[int] = None  # elements sharing one scale and zero point
    group_dim: Optional[int] = None  # the weight dimension groups run along (0 or 1)
    symmetric: Optional[bool] = None  # false: DeepSpeed implements asymmetric only
    modules: Optional[Tuple[str, ...]] = None  # post: module-name substrings whose weights are replaced


@dataclass(frozen=True)
class KVCacheSpec:
    # null: transformers' dynamic cache on the GPU; host: ours in host memory, allocated once at its final length
    # (zi_app/run/kvcache.py); offloaded: transformers' generate(cache_implementation="offloaded")
    cache_implementation: Optional[str] = None
    # where a decode step attends over the host cache: device (each layer's cached prefix copied up) or host
    # (the CPU reads it where it lives; only queries, outputs and new tokens' keys and values cross PCIe)
    attention: str = "device"
    # none: the host cache holds keys and values in the model's dtype; int8 or int4: quantized in groups of 64
    # along each head (a minimum and a step per group), dequantized on the GPU as each layer's prefix comes up
    quant: str = "none"
    # layers whose cache stays in GPU memory (at the host cache's width, spread evenly through the model) instead
    # of crossing PCIe every step: 0, up to the model's layers, or auto (as many as the GPU budget holds once
    # every weight is resident, or 0 where the plan predicts that slower; zi_app/plan/job.py)
    gpu_layers: str = "0"
    # the GPU kernels that dequantize a quantized cache: triton (one fused kernel, zi_app/run/kv_kernels.py), torch
    # (PyTorch's separate unpack, convert and scale kernels) or auto (triton unless the job runs on DeepSpeed's
    # CPU accelerator, or Triton is missing here; zi_app/plan/job.py)
    dequant: str = "auto"

    @property
    def attends_on_host(self) -> bool:
        """Whether decode steps attend on the CPU over the host cache (``attention=host``)."""
        return self.attention == "host"

    @property
    def bits(self) -> int:
        """Bits per cached key or value element: 16 (the model's 16-bit dtype) unless ``quant`` is int8/int4."""
        return {"int8": 8, "int4": 4}.get(self.quant, 16)

    @property
    def planned_gpu_layers(self) -> int:
        """``gpu_layers`` as a number; ``auto`` must have been planned first (zi_app.plan.job.plan_job)."""
        if self.gpu_layers == "auto":
            raise ValueError("kvcache.gpu_layers=auto is a plan's to resolve: run the job's plan "
                             "(zi_app.plan.job.plan_job) and use its spec")
        return int(self.gpu_layers)

    @property
    def planned_dequant(self) -> str:
        """``dequant`` as the job runs it (torch or triton); ``auto`` must have been planned first."""
        if self.dequant == "auto":
            raise ValueError("kvcache.dequant=auto is a plan's to resolve: run the job's plan "
                             "(zi_app.plan.job.plan_job) and use its spec")
        return self.dequant


@dataclass(frozen=True)
class MemorySpec:
    name: str = "reference"  # the preset's name
    prefetch_bucket_hh: float = 2  # stage3_prefetch_bucket_size in units of h*h
    max_live_hh: float = 2  # stage3_max_live_parameters in units of h*h
    persistence: str = "h"  # stage3_param_persistence_threshold: h, hh (h*h+1), auto (planned) or elements
    leaf_modules: bool = False  # leaf_module: decoder layers fetched whole, one hook each
    max_reuse_distance: Optional[str] = None  # stage3_max_reuse_distance: null, model (keep tied weights) or elements
    gpu_budget_gib: Optional[float] = None  # GPU memory the job may use (persistence=auto plans against it)
    fetch: str = "deepspeed"  # deepspeed: ZeRO-3's coordinator as shipped; overlap: zi_app/run/fetch.py
    max_inflight_fetches: int = 8  # overlap: fetches in flight before the host waits on the oldest
    # pinned partitions: torch (its caching host allocator: each rounded up to a power of two) or native
    # (DeepSpeed's DS_PIN_MEMORY_BACKEND=native: page-locked at their own size and registered with CUDA)
    pin_backend: str = "torch"


@dataclass(frozen=True)
class HardwareSpec:
    """The machine a job is planned for: its figures, and the constants of the planner's speed model.

    A null figure is measured on this machine (``hardware=auto``); a preset names another machine's.
    """

    name: str = "auto"
    device_name: Optional[str] = None  # substring of the CUDA device name a preset stands for ("H200")
    gpu_memory_gib: Optional[float] = None
    host_memory_gib: Optional[float] = None
    h2d_pinned_gbps: Optional[float] = None
    h2d_pageable_gbps: Optional[float] = None
    gpu_memory_gbps: Optional[float] = None
    gpu_tflops: Optional[float] = None
    gpu_count: Optional[int] = None  # GPUs of the machine (auto: counted here); null on a preset: any number
    gpu_peer_gbps: Optional[float] = None  # GPU-to-GPU GB/s per GPU, one direction (NVLink or PCIe P2P)
    # The speed model's constants (docs/planner.md), fitted to our H200 runs in docs/results/.
    stream_efficiency: float = 0.95  # share of h2d_pinned_gbps a decode step's pinned fetches reach
    pageable_efficiency: float = 0.38  # share of h2d_pageable_gbps pageable fetches reach
    fetch_overhead_s: float = 0.00033  # host seconds per ZeRO-3 fetch (hooked module forward)
    param_overhead_s: float = 0.00007  # host seconds per parameter's hooks: the floor of a step with little to stream
    dequant_overhead_s: float = 0.00018  # seconds per quantized weight matrix dequantized in a forward
    # seconds per weight matrix post-init quantization replaced, per forward (its own module, fetched and
    # dequantized apart: OPT-1.3B int8-post and int4-post on the H200)
    post_quant_overhead_s: float = 0.0007
    step_overhead_s: float = 0.02  # fixed host seconds per forward pass
    compute_efficiency: float = 0.57  # share of gpu_tflops the prefill's matmuls reach
    memory_efficiency: float = 0.3  # share of gpu_memory_gbps a decode step's weight and KV reads reach
    # GB/s of cached keys and values the host's CPU attention reads (kvcache.attention=host); null: measured on
    # this machine with its link rates (hardware=auto with a GPU), else 30 assumed (not yet measured on the H200)
    host_attention_gbps: Optional[float] = None


@dataclass(frozen=True)
class TrackingSpec:
    uri: str = "sqlite:///mlruns/mlflow.db"  # MLflow tracking URI: a SQLite store or a server URL
    experiment: str = "zero-inference"  # MLflow experiment name
    # Seconds a job (or a sweep's driver) keeps retrying a tracking server that does not answer when it starts,
    # before it fails: a server restarting, or busy for a moment, then loses no job. 0: fail after one probe.
    connect_timeout_s: float = 120


@dataclass(frozen=True)
class JobSpec:
    """One job, validated: defaults applied, dtype by its long name, the architecture read (``model.shape``)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    kvcache: KVCacheSpec = field(default_factory=KVCacheSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    batch: int = 1  # prompts per generate call on each rank
    devices: int = 1  # ranks (one per device) the job spans
    pin: bool = True  # offload_param.pin_memory
    prompt_len: int = 512
    gen_len: int = 32
    warmup: int = 1
    repeat: int = 3
    seed: int = 0
    dry_run: bool = False
    profile_step: bool = False
    verbose: bool = False
    cache_dir: str = MISSING  # measured link rates, model facts (plan/hardware.py, facts.py); conf/config.yaml
    tracking: TrackingSpec = field(default_factory=TrackingSpec)


def schema_fields(spec_class: type) -> Tuple[dataclasses.Field, ...]:
    """The fields of a spec class that are configuration keys (derived ones left out)."""
    return tuple(f for f in dataclasses.fields(spec_class) if not f.metadata.get(DERIVED))


def as_config(spec: Any) -> Dict[str, Any]:
    """A spec as the plain, nested dict of its configuration keys (derived fields left out): what a job's
    ``config.yaml`` artifact holds and what :func:`zi_app.config.spec.validate` reads back."""
    return {f.name: (as_config(value) if dataclasses.is_dataclass(value := getattr(spec, f.name)) else thaw(value))
            for f in schema_fields(type(spec))}


_TWINS: Dict[type, type] = {}


def _twin_type(hint: Any) -> Any:
    """The type a Hydra twin's field has for a spec field's ``hint``: spec classes by their twins, read-only
    containers by the ones OmegaConf knows."""
    if hint in _TWINS:
        return _TWINS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return Optional[_twin_type(next(arg for arg in args if arg is not type(None)))]
    if origin is tuple:
        return List[args[0]]
    if origin in (dict, collections.abc.Mapping):
        return Dict[str, Any]
    return hint


def _hydra_twin(spec_class: type, name: str) -> type:
    """A mutable dataclass with ``spec_class``'s configuration fields, defaults and docstring, for ConfigStore."""
    hints = typing.get_type_hints(spec_class)
    fields = []
    for f in schema_fields(spec_class):
        if f.default_factory is not dataclasses.MISSING:
            factory = _TWINS.get(f.default_factory, dict if f.default_factory is FrozenDict else f.default_factory)
            default = field(default_factory=factory)
        else:
            default = field(default=f.default)
        fields.append((f.name, _twin_type(hints[f.name]), default))
    twin = dataclasses.make_dataclass(name, fields)
    twin.__module__, twin.__doc__ = __name__, spec_class.__doc__ or f"Hydra schema of :class:`{spec_class.__name__}`."
    _TWINS[spec_class] = twin
    return twin


# Nested ones first: a twin's fields refer to the twins of the specs they hold. Module attributes, so that
# launchers can pickle composed configs (OmegaConf keeps a node's class by its qualified name).
ModelConfig = _hydra_twin(ModelSpec, "ModelConfig")
AioConfig = _hydra_twin(AioSpec, "AioConfig")
OffloadConfig = _hydra_twin(OffloadSpec, "OffloadConfig")
QuantConfig = _hydra_twin(QuantSpec, "QuantConfig")
KVCacheConfig = _hydra_twin(KVCacheSpec, "KVCacheConfig")
MemoryConfig = _hydra_twin(MemorySpec, "MemoryConfig")
HardwareConfig = _hydra_twin(HardwareSpec, "HardwareConfig")
TrackingConfig = _hydra_twin(TrackingSpec, "TrackingConfig")
ZIConfig = _hydra_twin(JobSpec, "ZIConfig")


def register() -> None:
    """Register the schema as ``zi_schema`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="zi_schema", node=ZIConfig)


register()


def schema_keys() -> Tuple[str, ...]:
    """The top-level keys of a zero-inference job: the groups and the workload keys of :class:`JobSpec`."""
    return tuple(f.name for f in schema_fields(JobSpec))
