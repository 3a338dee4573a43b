"""Turn a composed ZeRO-Inference config into DeepSpeed's config dict. Pure: no I/O.

Every size DeepSpeed needs that depends on the model (prefetch bucket, persistence thresholds, live
parameters, reuse distance, NVMe buffer size) is derived here and nowhere else, from the hidden size
``h``, the architecture in ``cfg.model.arch`` and, for the tuned memory settings, the model's facts
(:class:`zi_app.planner.ModelFacts`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from zi_app.planner import (DTYPE_BYTES, Hardware, ModelFacts, Prediction, Residency, Workload, offload_needed,
                             plan_residency, predict, predict_job)
from zi_app.schema import with_defaults

DS_DTYPE_KEYS = {"float16": "fp16", "bfloat16": "bf16"}


def hidden_size(arch: Dict[str, Any]) -> int:
    """The model's hidden size h, from a transformers config dict (OPT, LLaMA, BLOOM and most causal LMs)."""
    for key in ("hidden_size", "n_embed", "d_model", "n_embd"):
        if arch.get(key):
            return int(arch[key])
    raise KeyError("model.arch has no hidden_size (nor n_embed, d_model, n_embd)")


def largest_parameter_numel(arch: Dict[str, Any]) -> int:
    """Elements in the model's largest weight: the embedding/LM head, an MLP projection or a learned
    position table (OPT's has max_position_embeddings + 2 rows; an upper bound for models without one)."""
    h = hidden_size(arch)
    ffn = arch.get("ffn_dim") or arch.get("intermediate_size") or 4 * h
    embed = arch.get("word_embed_proj_dim") or h
    positions = int(arch.get("max_position_embeddings") or arch.get("n_positions") or 0) + 2
    return max(int(arch.get("vocab_size", 0)) * embed, h * int(ffn), positions * h)


def persistence_threshold(word: str, h: int) -> int:
    """stage3_param_persistence_threshold for a fixed ``memory.persistence`` setting.

    ``h``: the reference (only biases and norms stay resident); ``hh``: h*h+1, so every h x h
    projection (attention q/k/v/out) stays resident on the GPU too; digits: that many elements.
    ``auto`` is planned against the GPU budget (:func:`residency`); without a known budget it falls
    back to ``h``.
    """
    if word in ("h", "auto"):
        return h
    if word == "hh":
        return h * h + 1
    return int(word)


def weight_bytes(cfg) -> float:
    """Bytes per stored weight element: the dtype's, or the quantized width plus a scale and zero point per group."""
    if cfg.quant.mode == "none":
        return float(DTYPE_BYTES[cfg.model.dtype])
    return cfg.quant.bits / 8 + 2 * DTYPE_BYTES[cfg.model.dtype] / cfg.quant.group_size


def budget_bytes(cfg, device_bytes: Optional[int]) -> Optional[int]:
    """The GPU memory a job may use: ``memory.gpu_budget_gib`` if set, else the whole device (when known)."""
    if cfg.memory.gpu_budget_gib is not None:
        return int(cfg.memory.gpu_budget_gib * 2**30)
    return device_bytes


def workload(cfg) -> Workload:
    """The shapes, storage widths and streaming settings of ``cfg`` that its predictions depend on."""
    cfg = with_defaults(cfg)
    h = hidden_size(cfg.model.arch)
    memory, offload = cfg.memory, cfg.offload
    tied = bool(cfg.model.arch.get("tie_word_embeddings", True))
    return Workload(arch=dict(cfg.model.arch), dtype=cfg.model.dtype, weight_bytes=weight_bytes(cfg),
                    batch=cfg.batch, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len,
                    live_elements=int(memory.max_live_hh * h * h), offload=offload.device, pin=bool(cfg.pin),
                    kv_offloaded=cfg.kvcache.cache_implementation == "offloaded",
                    leaf_modules=bool(memory.leaf_modules),
                    # measured: only the reference's small buckets release the embedding between its two uses
                    refetch_tied=tied and not memory.leaf_modules and memory.max_reuse_distance != "model",
                    reads_checkpoint=cfg.model.weights == "pretrained" or cfg.quant.mode == "init",
                    nvme_buffer_elements=((offload.buffer_count or 5)
                                          * (offload.buffer_size or largest_parameter_numel(cfg.model.arch))
                                          if offload.device == "nvme" else 0),
                    overlap_fetch=memory.fetch == "overlap",
                    post_quant_modules=tuple(cfg.quant.modules) if cfg.quant.mode == "post" else (),
                    ranks=cfg.devices)


def residency(cfg, facts: ModelFacts, device_bytes: Optional[int] = None) -> Residency:
    """Persistence thresholds for ``cfg``, the peak GPU memory they are predicted to give and, where the
    budget is known, whether the job needs to offload weights at all."""
    cfg = with_defaults(cfg)
    h = hidden_size(cfg.model.arch)
    work = workload(cfg)
    budget = budget_bytes(cfg, device_bytes)
    if str(cfg.memory.persistence) == "auto" and budget is not None:
        plan = plan_residency(work, facts, budget, base_threshold=h)
    else:
        plan = predict(work, facts, persistence_threshold(str(cfg.memory.persistence), h), sys.maxsize)
    if budget is None:
        return plan
    return dataclasses.replace(plan, offload_needed=offload_needed(work, facts, budget))


def prediction(cfg, facts: ModelFacts, plan: Residency, hardware: Hardware) -> Prediction:
    """What ``cfg`` with residency ``plan`` is predicted to need and do on ``hardware``."""
    return predict_job(workload(cfg), facts, plan, hardware)


def max_reuse_distance(setting: Optional[str], facts: Optional[ModelFacts]) -> Optional[int]:
    """stage3_max_reuse_distance: ``model`` = every parameter's count, so a weight used twice in one
    forward (a tied embedding / LM head) stays on the GPU in between instead of being fetched twice."""
    if setting is None:
        return None
    if setting == "model":
        return sum(facts.param_numels) + 1
    return int(setting)


def _zero_optimization(cfg, h: int, facts: Optional[ModelFacts], plan: Optional[Residency]) -> Dict[str, Any]:
    memory = cfg.memory
    zero: Dict[str, Any] = {
        "stage": 3,
        "stage3_prefetch_bucket_size": int(memory.prefetch_bucket_hh * h * h),
        "stage3_param_persistence_threshold": (plan.param_threshold if plan
                                               else persistence_threshold(str(memory.persistence), h)),
        "stage3_max_live_parameters": int(memory.max_live_hh * h * h),
    }
    if plan and plan.model_threshold < sys.maxsize:
        zero["stage3_model_persistence_threshold"] = plan.model_threshold
    reuse = max_reuse_distance(memory.max_reuse_distance, facts)
    if reuse is not None:
        zero["stage3_max_reuse_distance"] = reuse
    if memory.leaf_modules and facts.leaf_classes:
        zero["leaf_module"] = {"classes": list(facts.leaf_classes)}
    offload = cfg.offload
    if offload.device == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(cfg.pin)}
    elif offload.device == "nvme":
        zero["offload_param"] = {
            "device": "nvme",
            "pin_memory": bool(cfg.pin),
            "nvme_path": offload.nvme_path,
            "buffer_count": offload.buffer_count or 5,
            "buffer_size": offload.buffer_size or largest_parameter_numel(cfg.model.arch),
        }
    return zero


def _weight_quantization(quant) -> Optional[Dict[str, Any]]:
    if quant.mode == "none":
        return None
    spec = {"num_bits": quant.bits, "group_size": quant.group_size, "group_dim": quant.group_dim,
            "symmetric": bool(quant.symmetric)}
    if quant.mode == "init":
        return {"quantized_initialization": spec}
    return {"post_init_quant": {name: dict(spec) for name in quant.modules}}


def needs_facts(cfg) -> bool:
    """Whether the memory group derives settings from the model's classes and parameter sizes."""
    memory = cfg.memory
    return bool(memory.leaf_modules) or str(memory.persistence) == "auto" or memory.max_reuse_distance == "model"


def build_ds_config(cfg: Any, facts: Optional[ModelFacts] = None, device_bytes: Optional[int] = None,
                    planned: Optional[Residency] = None) -> Dict[str, Any]:
    """Return the complete DeepSpeed config for a ZeRO-Inference job.

    ``cfg`` is the composed config (or the node where the zero-inference groups are mounted); keys it
    lacks take the schema's defaults. ``facts`` (decoder-layer classes and parameter sizes) are needed
    by the tuned memory settings; when not given they are read from the architecture on the meta
    device (imports transformers, allocates nothing). ``device_bytes`` is the GPU's memory, the budget
    ``persistence=auto`` plans against when ``memory.gpu_budget_gib`` is not set; ``planned`` is the
    residency a job's plan already made (:class:`zi_app.jobplan.JobPlan`), planned here when not given.
    """
    cfg = with_defaults(cfg)
    h = hidden_size(cfg.model.arch)
    if facts is None and needs_facts(cfg):
        from zi_app.model import model_facts

        facts = model_facts(dict(cfg.model.arch))
    plan = (planned or residency(cfg, facts, device_bytes)) if str(cfg.memory.persistence) == "auto" else None
    ds: Dict[str, Any] = {key: {"enabled": cfg.model.dtype == dtype} for dtype, key in DS_DTYPE_KEYS.items()}
    ds["zero_optimization"] = _zero_optimization(cfg, h, facts, plan)
    if cfg.offload.device == "nvme":
        ds["aio"] = OmegaConf.to_container(cfg.offload.aio) if cfg.offload.aio else {}
    quantization = _weight_quantization(cfg.quant)
    if quantization:
        ds["weight_quantization"] = quantization
    ds["steps_per_print"] = 2000
    # DeepSpeed checks train_batch_size = micro batch x world size: ``batch`` is what each rank generates for.
    ds["train_batch_size"] = int(cfg.batch) * int(cfg.devices)
    ds["wall_clock_breakdown"] = False
    return ds
