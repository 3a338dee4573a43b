"""Turn a composed config into a planned job, once: validated, architecture known, DeepSpeed config built,
GPU residency, host memory and speed predicted for the hardware it is planned for, and what keeps it from
running there listed.

The :class:`JobPlan` is made once per job and passed down to whoever needs it (the run, the dry run, the
planner CLI, the sweep); nothing downstream re-validates or re-plans. Imports transformers only when called
and never creates a CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from omegaconf import DictConfig, open_dict

from zi_app import dsconfig, machine, preflight
from zi_app.planner import DTYPE_BYTES, Hardware, ModelFacts, Prediction, Residency, predicted_job_s
from zi_app.schema import ConfigError, validate

GIB = 2**30


@dataclass(frozen=True)
class JobPlan:
    """One job's plan: the validated config, its DeepSpeed config, the predicted GPU residency against the
    budget, and ``problems``: what keeps it from running on this machine (empty when it can)."""

    cfg: DictConfig
    ds_config: dict
    residency: Residency
    budget_bytes: Optional[int]
    problems: Tuple[ConfigError, ...]
    hardware: Hardware
    prediction: Prediction
    facts: ModelFacts  # the model's parameter sizes and hooked modules, read once for every use of the plan

    def check_runnable(self) -> None:
        """Raise the first problem: a real run refuses before anything loads."""
        if self.problems:
            raise self.problems[0]

    @property
    def fits(self) -> bool:
        """Whether the job can run on the hardware it was planned for."""
        return not self.problems

    @property
    def reason(self) -> str:
        """Why it cannot (every problem, ``; `` between them); empty when it fits."""
        return "; ".join(str(problem) for problem in self.problems)

    @property
    def predicted_peak_gpu_bytes(self) -> int:
        return self.prediction.peak_gpu_bytes

    @property
    def predicted_peak_host_bytes(self) -> int:
        return self.prediction.peak_host_bytes

    @property
    def predicted_streamed_bytes_per_step(self) -> int:
        return self.prediction.streamed_bytes_per_step

    @property
    def predicted_peer_bytes_per_step(self) -> int:
        return self.prediction.peer_bytes_per_step

    @property
    def predicted_decode_step_s(self) -> Optional[float]:
        return self.prediction.decode_step_s

    @property
    def predicted_prefill_s(self) -> Optional[float]:
        return self.prediction.prefill_s

    @property
    def predicted_tokens_per_sec(self) -> Optional[float]:
        return self.prediction.tokens_per_sec

    @property
    def predicted_job_s(self) -> Optional[float]:
        """Predicted wall seconds of the whole job (process start to result); None without a speed prediction."""
        weights = sum(self.facts.param_numels) * DTYPE_BYTES[self.cfg.model.dtype]
        return predicted_job_s(self.prediction, weights, self.cfg.warmup, self.cfg.repeat, self.cfg.gen_len)

    def predicted_metrics(self) -> Dict[str, float]:
        """The predictions as MLflow metrics (``predicted_*``, docs/metrics.md); unknown ones left out."""
        metrics = {"predicted_peak_gpu_bytes": self.predicted_peak_gpu_bytes,
                   "predicted_resident_bytes": self.residency.resident_bytes,
                   "predicted_peak_host_bytes": self.predicted_peak_host_bytes,
                   "predicted_streamed_bytes_per_step": self.predicted_streamed_bytes_per_step,
                   "predicted_peer_bytes_per_step": self.predicted_peer_bytes_per_step,
                   "predicted_decode_step_s": self.predicted_decode_step_s,
                   "predicted_prefill_s": self.predicted_prefill_s,
                   "predicted_tokens_per_sec": self.predicted_tokens_per_sec}
        return {key: float(value) for key, value in metrics.items() if value is not None}


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


def _host_problems(cfg: DictConfig, hardware: Hardware, prediction: Prediction,
                   here: bool) -> Tuple[ConfigError, ...]:
    problems = []
    host = hardware.host_memory_bytes
    if host is not None and prediction.peak_host_bytes > host:
        ways = [way for way, applies in (("offload=nvme", cfg.offload.device == "cpu"),
                                         ("quant=int4", cfg.quant.mode == "none"),
                                         ("pin=false", bool(cfg.pin) and cfg.offload.device == "cpu"),
                                         ("a smaller batch", cfg.kvcache.cache_implementation == "offloaded"))
                if applies]
        problems.append(ConfigError(
            "offload", cfg.offload.device,
            f"a setting whose host memory fits: predicted peak host RSS {prediction.peak_host_bytes / GIB:.1f} GiB "
            f"(offloaded weights{', pinned: rounded up to powers of two' if cfg.pin else ''}) exceeds the "
            f"{host / GIB:.1f} GiB {'available on this machine' if hardware.name == 'auto' else 'of hardware=' + hardware.name}"
            f" (hardware.host_memory_gib); try {', '.join(ways) or 'a smaller model'}"))
    if cfg.offload.device == "nvme" and here:
        free = machine.free_disk_bytes(cfg.offload.nvme_path)
        if free is not None and prediction.nvme_bytes > free:
            problems.append(ConfigError(
                "offload.nvme_path", cfg.offload.nvme_path,
                f"a directory with room for the swapped weights: {prediction.nvme_bytes / GIB:.1f} GiB needed, "
                f"{free / GIB:.1f} GiB free there; free space, choose another disk, or quant=int4"))
    return tuple(problems)


def _device_problems(cfg: DictConfig, hardware: Hardware, found: Tuple[ConfigError, ...]) -> Tuple[ConfigError, ...]:
    """``devices`` beyond the GPUs of the hardware planned for, unless the environment check (``found``)
    already refused them here."""
    if hardware.gpu_count is None or cfg.devices <= hardware.gpu_count or any(p.key == "devices" for p in found):
        return ()
    where = "this machine has" if hardware.name == "auto" else f"hardware={hardware.name} has"
    return (ConfigError("devices", cfg.devices,
                        f"at most {hardware.gpu_count}: {where} {hardware.gpu_count} GPU(s) (hardware.gpu_count), "
                        f"one rank per GPU"),)


def plan_job(cfg: DictConfig, cuda: bool, here: bool = True) -> JobPlan:
    """Plan ``cfg`` for the hardware it names (``hardware``; ``auto`` is this machine; ``cuda``: whether a
    CUDA device is usable here).

    Raises :class:`ConfigError` for a config that is invalid as configuration; what the hardware lacks
    (GPU memory for the predicted peak, host memory) goes into ``problems``, and so, with ``here`` (the job
    would run on this machine), what this machine lacks: CUDA, libaio, the NVMe directory or its free
    space, the GPU of a hardware preset. ``here=False`` plans for a preset's machine instead (zi-plan).
    """
    from zi_app.engine import prefer_cpu_accelerator
    from zi_app.model import model_facts

    prefer_cpu_accelerator()
    cfg = prepare(cfg)
    facts = model_facts(dict(cfg.model.arch))
    hardware = machine.hardware(cfg, cuda)
    device_bytes = hardware.gpu_memory_bytes if (cuda or hardware.name != "auto") else None
    residency = dsconfig.residency(cfg, facts, device_bytes)
    budget = dsconfig.budget_bytes(cfg, device_bytes)
    prediction = dsconfig.prediction(cfg, facts, residency, hardware)
    mismatch = machine.hardware_problem(hardware, cuda) if here else None
    environment = tuple(preflight.environment_problems(cfg, cuda)) if here else ()
    problems = (*environment, *_device_problems(cfg, hardware, environment), *_over_budget(cfg, residency, budget),
                *_host_problems(cfg, hardware, prediction, here),
                *((ConfigError("hardware", hardware.name, mismatch),) if mismatch else ()))
    ds_config = dsconfig.build_ds_config(cfg, facts, device_bytes, residency)
    return JobPlan(cfg, ds_config, residency, budget, problems, hardware, prediction, facts)


def ready(cfg: DictConfig, cuda: bool) -> JobPlan:
    """The plan of a job about to run here: :func:`plan_job`, refused at its first problem, and the dtype
    checked with DeepSpeed's accelerator (which a dry run need not import) first: a GPU model on a CPU
    machine is told to use a small model, before what its size would need of this host."""
    plan = plan_job(cfg, cuda)
    preflight.check_dtype_supported(plan.cfg)
    plan.check_runnable()
    return plan


def sweep_plan(config: DictConfig, gpus: Optional[int] = None) -> Tuple[Optional[ConfigError], Optional[float]]:
    """What a sweep's parent knows of a job before starting it: (why it would be refused before loading,
    its :attr:`JobPlan.predicted_job_s`). The refusal is its invalid config, ``devices`` beyond the ``gpus``
    the sweep hands out (None: no GPUs to hand out, ranks run on the CPU), or the first problem of its plan,
    made the way the job itself makes it; None when it would run, when it is a dry run (which only warns) or
    when ``config`` is not a zero-inference job. Lets a sweep's parent refuse jobs without starting their
    processes and plan the sweep's time (None where unknown)."""
    if not all(key in config for key in ("model", "offload", "quant", "memory")) or config.get("dry_run"):
        return None, None
    import torch

    try:
        plan = plan_job(config, torch.cuda.is_available())
    except ConfigError as error:
        return error, None
    if gpus is not None and plan.cfg.devices > gpus:
        return ConfigError("devices", plan.cfg.devices,
                           f"at most {gpus}: this sweep has {gpus} GPU(s) (hydra.launcher.gpus, else "
                           f"CUDA_VISIBLE_DEVICES or every GPU nvidia-smi lists), one per rank"), None
    return (plan.problems[0], None) if plan.problems else (None, plan.predicted_job_s)
