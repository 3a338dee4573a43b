"""A job spec as DeepSpeed's config dict. Pure: no I/O.

Every size DeepSpeed needs (prefetch bucket, persistence thresholds, live parameters, reuse distance, NVMe
buffers) comes from the spec's model shape (``h`` = hidden size), the model's facts and the residency the
plan chose; the sizes predictions share with it are derived in :mod:`zi_app.plan.workload`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, Optional

from zi_app.config.schema import JobSpec
from zi_app.plan.facts import ModelFacts
from zi_app.plan.memory import Residency
from zi_app.plan.workload import NVME_BUFFER_COUNT, nvme_buffer_size, persistence_threshold

DS_DTYPE_KEYS = {"float16": "fp16", "bfloat16": "bf16"}


def needs_facts(spec: JobSpec) -> bool:
    """Whether the memory group derives settings from the model's classes and parameter sizes."""
    memory = spec.memory
    return memory.leaf_modules or memory.persistence == "auto" or memory.max_reuse_distance == "model"


def max_reuse_distance(setting: Optional[str], facts: Optional[ModelFacts]) -> Optional[int]:
    """stage3_max_reuse_distance: ``model`` = every parameter's count, so a weight used twice in one
    forward (a tied embedding / LM head) stays on the GPU in between instead of being fetched twice."""
    if setting is None:
        return None
    if setting == "model":
        return sum(facts.param_numels) + 1
    return int(setting)


def _zero_optimization(spec: JobSpec, facts: Optional[ModelFacts], plan: Optional[Residency]) -> Dict[str, Any]:
    memory, h = spec.memory, spec.model.shape.hidden_size
    zero: Dict[str, Any] = {
        "stage": 3,
        "stage3_prefetch_bucket_size": int(memory.prefetch_bucket_hh * h * h),
        "stage3_param_persistence_threshold": (plan.param_threshold if plan
                                               else persistence_threshold(memory.persistence, h)),
        "stage3_max_live_parameters": int(memory.max_live_hh * h * h),
    }
    if plan and plan.model_threshold < sys.maxsize:
        zero["stage3_model_persistence_threshold"] = plan.model_threshold
    reuse = max_reuse_distance(memory.max_reuse_distance, facts)
    if reuse is not None:
        zero["stage3_max_reuse_distance"] = reuse
    if memory.leaf_modules and facts.leaf_classes:
        zero["leaf_module"] = {"classes": list(facts.leaf_classes)}
    offload = spec.offload
    if offload.device == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.pin}
    elif offload.device == "nvme":
        zero["offload_param"] = {
            "device": "nvme",
            "pin_memory": spec.pin,
            "nvme_path": offload.nvme_path,
            "buffer_count": offload.buffer_count or NVME_BUFFER_COUNT,
            "buffer_size": nvme_buffer_size(spec),
        }
    return zero


def _weight_quantization(spec: JobSpec) -> Optional[Dict[str, Any]]:
    quant = spec.quant
    if quant.mode == "none":
        return None
    group = {"num_bits": quant.bits, "group_size": quant.group_size, "group_dim": quant.group_dim,
             "symmetric": bool(quant.symmetric)}
    if quant.mode == "init":
        return {"quantized_initialization": group}
    return {"post_init_quant": {name: dict(group) for name in quant.modules}}


def build_ds_config(spec: JobSpec, facts: Optional[ModelFacts] = None,
                    planned: Optional[Residency] = None) -> Dict[str, Any]:
    """The complete DeepSpeed config of a ZeRO-Inference job.

    ``facts`` (decoder-layer classes and parameter sizes) are needed where :func:`needs_facts`; ``planned``
    is the residency the job's plan chose, whose thresholds ``memory.persistence=auto`` takes.
    """
    plan = planned if spec.memory.persistence == "auto" else None
    ds: Dict[str, Any] = {key: {"enabled": spec.model.dtype == dtype} for dtype, key in DS_DTYPE_KEYS.items()}
    ds["zero_optimization"] = _zero_optimization(spec, facts, plan)
    if spec.offload.device == "nvme":
        ds["aio"] = dataclasses.asdict(spec.offload.aio) if spec.offload.aio else {}
    quantization = _weight_quantization(spec)
    if quantization:
        ds["weight_quantization"] = quantization
    ds["steps_per_print"] = 2000
    # DeepSpeed checks train_batch_size = micro batch x world size: ``batch`` is what each rank generates for.
    ds["train_batch_size"] = spec.batch * spec.devices
    ds["wall_clock_breakdown"] = False
    return ds
