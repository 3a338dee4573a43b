"""Build a model under ZeRO-3 the way zi_app does, then report what ZeRO-3 holds and what the model computes.

Usage: ``python quant_probe.py OUT.pt [hydra overrides...]`` (one model per process: ZeRO-3's state is
process-wide). Writes ``torch.save`` of a dict:

- ``held``: parameter name -> bytes of its partition (``param.ds_tensor``), its dtype, whether DeepSpeed
  quantized it (``weight_quantized``), whether its native pinned-memory backend page-locked it
  (``ds_pinned``) and whether ZeRO-3 keeps it resident (``ds_persist``); with one rank the partition is the
  whole parameter;
- ``logits``: float32 logits of one forward over the app's prompts (``zi_app.run.inference.random_prompts``);
- ``arch`` and ``seed``: the architecture and seed of its random weights, for an unquantized reference
  (:func:`zi_app.run.loading.seed_weights` gives a plain model the same values).
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir

from zi_app import conf_dir, validate
from zi_app.run import engine
from zi_app.plan.job import ready
from zi_app.config.schema import thaw
from zi_app.run.loading import load_model, zero3_construction
from zi_app.run.inference import random_prompts


def held_storage(model: torch.nn.Module) -> dict:
    """What each ZeRO-3 parameter's partition holds."""
    return {name: {"bytes": p.ds_tensor.numel() * p.ds_tensor.element_size(), "dtype": str(p.ds_tensor.dtype),
                   "quantized": bool(getattr(p, "weight_quantized", False)),
                   "native_pinned": bool(getattr(p.ds_tensor, "ds_pinned", False)),
                   "persistent": bool(p.ds_persist)}
            for name, p in model.named_parameters()}


def main(out: str, overrides: list) -> None:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        plan = ready(validate(compose("config", overrides=overrides)), torch.cuda.is_available())
        cfg, ds_config = plan.spec, plan.ds_config
    engine.select_pin_backend(cfg.memory.pin_backend)
    engine.init_distributed()
    with zero3_construction(ds_config):
        model = engine.initialize(load_model(cfg), ds_config)
        prompts = random_prompts(cfg.batch, cfg.prompt_len, model.config.vocab_size, cfg.seed, engine.device())
        with torch.no_grad():
            logits = model(input_ids=prompts).logits.float().cpu()
        held = held_storage(model)
    torch.save({"held": held, "logits": logits, "arch": thaw(cfg.model.arch), "seed": cfg.seed}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
