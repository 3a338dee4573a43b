"""Turn a composed config into a planned job, once: validated, architecture known, DeepSpeed config built,
GPU residency predicted, and what this machine lacks to run it listed.

The :class:`JobPlan` is made once per job and passed down to whoever needs it (the run, the dry run);
nothing downstream re-validates or re-plans. Imports torch and transformers only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from omegaconf import DictConfig, open_dict

from zi_app import dsconfig, preflight
from zi_app.planner import Residency
from zi_app.schema import ConfigError, validate


@dataclass(frozen=True)
class JobPlan:
    """One job's plan: the validated config, its DeepSpeed config, the predicted GPU residency against the
    budget, and ``problems``: what keeps it from running on this machine (empty when it can)."""

    cfg: DictConfig
    ds_config: dict
    residency: Residency
    budget_bytes: Optional[int]
    problems: Tuple[ConfigError, ...]

    def check_runnable(self) -> None:
        """Raise the first problem: a real run refuses before anything loads."""
        if self.problems:
            raise self.problems[0]


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


def _over_budget(cfg: DictConfig, residency: Residency, budget: Optional[int]) -> Tuple[ConfigError, ...]:
    if budget is None or residency.predicted_peak_bytes <= budget:
        return ()
    return (ConfigError(
        "batch", cfg.batch,
        f"a batch that fits: predicted peak GPU memory {residency.predicted_peak_bytes / 2**30:.1f} GiB "
        f"(resident weights {residency.resident_bytes / 2**30:.1f} GiB + KV cache, activations, live parameters) "
        f"exceeds the budget of {budget / 2**30:.1f} GiB; lower batch or prompt_len + gen_len, "
        f"or raise memory.gpu_budget_gib"),)


def plan_job(cfg: DictConfig, cuda: bool) -> JobPlan:
    """Plan ``cfg`` for this machine (``cuda``: whether a CUDA device is usable).

    Raises :class:`ConfigError` for a config that is invalid as configuration; what only this machine
    lacks (CUDA, libaio, the NVMe directory, GPU memory for the predicted peak) goes into ``problems``.
    """
    import torch

    from zi_app.engine import prefer_cpu_accelerator
    from zi_app.model import model_facts

    prefer_cpu_accelerator()
    cfg = prepare(cfg)
    facts = model_facts(dict(cfg.model.arch))
    device_bytes = torch.cuda.mem_get_info()[1] if cuda else None
    residency = dsconfig.residency(cfg, facts, device_bytes)
    budget = dsconfig.budget_bytes(cfg, device_bytes)
    problems = (*preflight.environment_problems(cfg, cuda), *_over_budget(cfg, residency, budget))
    return JobPlan(cfg, dsconfig.build_ds_config(cfg, facts, device_bytes), residency, budget, problems)


def ready(cfg: DictConfig, cuda: bool) -> JobPlan:
    """The plan of a job about to run here: :func:`plan_job`, refused at its first problem, and the dtype
    checked with DeepSpeed's accelerator (which a dry run need not import)."""
    plan = plan_job(cfg, cuda)
    plan.check_runnable()
    preflight.check_dtype_supported(plan.cfg)
    return plan
