"""Turn a composed ZeRO-Inference config into DeepSpeed's config dict. Pure: no I/O, no heavy imports.

Every size DeepSpeed needs that depends on the model (prefetch bucket, persistence threshold, live
parameters, NVMe buffer size) is derived here and nowhere else, from the hidden size ``h`` and the
architecture in ``cfg.model.arch``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from omegaconf import OmegaConf

from zi_app.schema import with_defaults

DS_DTYPE_KEYS = {"float16": "fp16", "bfloat16": "bf16"}


def hidden_size(arch: Dict[str, Any]) -> int:
    """The model's hidden size h, from a transformers config dict (OPT, LLaMA, BLOOM and most causal LMs)."""
    for key in ("hidden_size", "n_embed", "d_model", "n_embd"):
        if arch.get(key):
            return int(arch[key])
    raise KeyError("model.arch has no hidden_size (nor n_embed, d_model, n_embd)")


def largest_parameter_numel(arch: Dict[str, Any]) -> int:
    """Elements in the model's largest weight: the embedding/LM head or an MLP projection."""
    h = hidden_size(arch)
    ffn = arch.get("ffn_dim") or arch.get("intermediate_size") or 4 * h
    embed = arch.get("word_embed_proj_dim") or h
    return max(int(arch.get("vocab_size", 0)) * embed, h * int(ffn))


def persistence_threshold(word: str, h: int) -> int:
    """stage3_param_persistence_threshold for the memory group's ``persistence`` setting.

    ``h``: the reference (only biases and norms stay resident); ``hh``: h*h+1, so every h x h
    projection (attention q/k/v/out) stays resident on the GPU too; digits: that many elements.
    """
    if word == "h":
        return h
    if word == "hh":
        return h * h + 1
    return int(word)


def _zero_optimization(cfg, h: int, leaf_classes: Optional[Sequence[str]]) -> Dict[str, Any]:
    memory = cfg.memory
    zero: Dict[str, Any] = {
        "stage": 3,
        "stage3_prefetch_bucket_size": int(memory.prefetch_bucket_hh * h * h),
        "stage3_param_persistence_threshold": persistence_threshold(str(memory.persistence), h),
        "stage3_max_live_parameters": int(memory.max_live_hh * h * h),
    }
    if memory.max_reuse_distance is not None:
        zero["stage3_max_reuse_distance"] = int(memory.max_reuse_distance)
    if memory.leaf_modules and leaf_classes:
        zero["leaf_module"] = {"classes": list(leaf_classes)}
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


def build_ds_config(cfg: Any, leaf_classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Return the complete DeepSpeed config for a ZeRO-Inference job.

    ``cfg`` is the composed config (or the node where the zero-inference groups are mounted); keys it
    lacks take the schema's defaults. ``leaf_classes`` are the decoder-layer class names used when
    ``memory.leaf_modules`` is on (found from the model class by :func:`zi_app.model.decoder_layer_classes`).
    """
    cfg = with_defaults(cfg)
    h = hidden_size(cfg.model.arch)
    ds: Dict[str, Any] = {key: {"enabled": cfg.model.dtype == dtype} for dtype, key in DS_DTYPE_KEYS.items()}
    ds["zero_optimization"] = _zero_optimization(cfg, h, leaf_classes)
    if cfg.offload.device == "nvme":
        ds["aio"] = OmegaConf.to_container(cfg.offload.aio) if cfg.offload.aio else {}
    quantization = _weight_quantization(cfg.quant)
    if quantization:
        ds["weight_quantization"] = quantization
    ds["steps_per_print"] = 2000
    ds["train_batch_size"] = int(cfg.batch)
    ds["wall_clock_breakdown"] = False
    return ds
