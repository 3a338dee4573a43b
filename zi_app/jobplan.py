"""Turn a composed config into a runnable job: validated, architecture known, DeepSpeed config planned.

Shared by the Hydra app and :func:`zi_app.run_inference`; imports torch and transformers only when called.
"""

from __future__ import annotations

from typing import Tuple

from omegaconf import DictConfig, open_dict

from zi_app import dsconfig, preflight
from zi_app.planner import Residency
from zi_app.schema import ConfigError, validate


def prepare(cfg: DictConfig) -> DictConfig:
    """Validate the composed config; for real weights read the checkpoint's architecture first."""
    cfg = validate(cfg)
    if cfg.model.weights == "pretrained":
        from zi_app.model import architecture_from_checkpoint

        arch = architecture_from_checkpoint(cfg.model.path)
        with open_dict(cfg):
            cfg.model.arch = arch
            cfg.model.max_positions = cfg.model.max_positions or arch.get("max_position_embeddings")
        cfg = validate(cfg)
    return cfg


def plan(cfg: DictConfig, cuda: bool) -> Tuple[dict, Residency]:
    """The DeepSpeed config and the predicted GPU residency; refuses a job predicted not to fit its budget."""
    import torch

    from zi_app.model import model_facts

    facts = model_facts(dict(cfg.model.arch))
    device_bytes = torch.cuda.mem_get_info()[1] if cuda else None
    residency = dsconfig.residency(cfg, facts, device_bytes)
    budget = dsconfig.budget_bytes(cfg, device_bytes)
    if cuda and budget is not None and residency.predicted_peak_bytes > budget:
        raise ConfigError(
            "batch", cfg.batch,
            f"a batch that fits: predicted peak GPU memory {residency.predicted_peak_bytes / 2**30:.1f} GiB "
            f"(resident weights {residency.resident_bytes / 2**30:.1f} GiB + KV cache, activations, live parameters) "
            f"exceeds the budget of {budget / 2**30:.1f} GiB; lower batch or prompt_len + gen_len, "
            f"or raise memory.gpu_budget_gib")
    return dsconfig.build_ds_config(cfg, facts, device_bytes), residency


def ready(cfg: DictConfig, cuda: bool, running: bool = True) -> Tuple[DictConfig, dict, Residency]:
    """Everything before loading, in order: :func:`prepare`, the machine checks (a real run also asks
    DeepSpeed's accelerator about the dtype; a dry run need not import DeepSpeed), and :func:`plan`.

    Returns the validated config, the DeepSpeed config and the predicted residency.
    """
    cfg = prepare(cfg)
    preflight.check_environment(cfg, cuda)
    if running:
        preflight.check_dtype_supported(cfg)
    ds_config, residency = plan(cfg, cuda)
    return cfg, ds_config, residency
