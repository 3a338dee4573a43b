"""Turn a job spec into a planned job, once: the model's facts read, DeepSpeed config built, GPU residency,
host memory and speed predicted for the hardware it is planned for, and what keeps it from running there
listed.

The :class:`JobPlan` is made once per job and passed down to whoever needs it (the run, the dry run, the
planner CLI, the sweep); nothing downstream re-validates or re-plans. Imports transformers only when called
and never creates a CUDA context.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from zi_app.config.checks import ConfigError, every_problem
from zi_app.config.schema import JobSpec
from zi_app.plan import dsconfig, hardware as machine, preflight
from zi_app.plan.facts import ModelFacts, model_facts
from zi_app.plan.hardware import Hardware
from zi_app.plan.memory import (Residency, host_parts, offload_needed, plan_kv_gpu_layers, plan_residency,
                                predict)
from zi_app.plan.speed import Prediction, predict_job, predicted_job_s
from zi_app.plan.workload import DTYPE_BYTES, Workload, budget_bytes, persistence_threshold, workload

GIB = 2**30


@dataclass(frozen=True)
class JobPlan:
    """One job's plan: its spec, its DeepSpeed config, the predicted GPU residency against the budget, and
    ``problems``: what keeps it from running on this machine (empty when it can)."""

    spec: JobSpec
    ds_config: dict
    residency: Residency
    budget_bytes: Optional[int]
    problems: Tuple[ConfigError, ...]
    hardware: Hardware
    prediction: Prediction
    facts: ModelFacts  # the model's parameter sizes and hooked modules, read once for every use of the plan

    def check_runnable(self) -> None:
        """Raise every problem, in one error: a real run refuses before anything loads."""
        if self.problems:
            raise every_problem(self.problems)

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
    def predicted_nvme_bytes(self) -> int:
        return self.prediction.nvme_bytes

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
        weights = sum(self.facts.param_numels) * DTYPE_BYTES[self.spec.model.dtype]
        return predicted_job_s(self.prediction, weights, self.spec.warmup, self.spec.repeat, self.spec.gen_len)

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


def residency(spec: JobSpec, work: Workload, facts: ModelFacts, budget: Optional[int]) -> Residency:
    """Persistence thresholds for ``spec``, the peak GPU memory they are predicted to give and, where the
    ``budget`` is known, whether the job needs to offload weights at all."""
    h = spec.model.shape.hidden_size
    if spec.memory.persistence == "auto" and budget is not None:
        planned = plan_residency(work, facts, budget, base_threshold=h)
    else:
        planned = predict(work, facts, persistence_threshold(spec.memory.persistence, h), sys.maxsize)
    if budget is None:
        return planned
    return dataclasses.replace(planned, offload_needed=offload_needed(work, facts, budget))


def _keep_kv_layers(spec: JobSpec, work: Workload, facts: ModelFacts, planned: Residency, budget: Optional[int],
                    hw: Hardware) -> Tuple[JobSpec, Workload, Residency]:
    """kvcache.gpu_layers=auto, planned: as many layers' caches as the budget keeps on the GPU, or none where that
    is predicted slower on ``hw`` (a quantized layer's dequantization on the GPU against its bytes over the link;
    the step is linear in the layers kept, so one of the two ends is the best) or the budget is unknown; written
    into the spec the job runs with and the workload its predictions use."""
    fitting = plan_kv_gpu_layers(work, facts, planned, budget) if budget is not None else 0
    choices = []
    for layers in sorted({0, fitting}, reverse=True):
        kept_work = dataclasses.replace(work, kv_gpu_layers=layers)
        peak = predict(kept_work, facts, planned.param_threshold, planned.model_threshold).predicted_peak_bytes
        kept = dataclasses.replace(planned, predicted_peak_bytes=peak)
        choices.append((predict_job(kept_work, facts, kept, hw).tokens_per_sec or 0.0, layers, kept_work, kept))
    _, layers, work, kept = max(choices, key=lambda choice: choice[0])  # ties: the first, more layers kept
    spec = dataclasses.replace(spec, kvcache=dataclasses.replace(spec.kvcache, gpu_layers=str(layers)))
    return spec, work, kept


def _over_budget(spec: JobSpec, residency: Residency, budget: Optional[int]) -> Tuple[ConfigError, ...]:
    if budget is None or residency.predicted_peak_bytes <= budget:
        return ()
    return (ConfigError(
        "batch", spec.batch,
        f"a batch that fits: predicted peak GPU memory {residency.predicted_peak_bytes / 2**30:.1f} GiB "
        f"(resident weights {residency.resident_bytes / 2**30:.1f} GiB + KV cache, activations, live parameters) "
        f"exceeds the budget of {budget / 2**30:.1f} GiB; lower batch or prompt_len + gen_len, "
        f"or raise memory.gpu_budget_gib"),)


def _host_problems(spec: JobSpec, hardware: Hardware, work: Workload, facts: ModelFacts, residency: Residency,
                   prediction: Prediction,
                   here: bool) -> Tuple[ConfigError, ...]:
    problems = []
    host = hardware.host_memory_bytes
    limit = hardware.host_limit or f"of hardware={hardware.name}"
    # On the CPU accelerator the KV cache and activations are host memory: past the host alone, the batch
    # (or the sequence) is what to change, not where the weights live.
    transient = work.ranks * (residency.predicted_peak_bytes - residency.resident_bytes) if work.on_cpu else 0
    if host is not None and transient > host:
        problems.append(ConfigError(
            "batch", spec.batch,
            f"a batch that fits: on the CPU the KV cache, activations and gathered weights are host memory, "
            f"predicted {transient / GIB:.1f} GiB, more than the {host / GIB:.1f} GiB {limit}; lower batch or "
            f"prompt_len + gen_len"))
    elif host is not None and prediction.peak_host_bytes > host:
        parts = host_parts(work, facts, residency)
        # The costs of our own path a user can switch off, each with the switch (issue 20's three costs).
        ways = [way for way, applies in (
            ("memory.pin_backend=native", parts.get("pinning round-up", 0) > 0 and not work.pin_exact),
            ("kvcache=cpu", parts.get("KV size classes", 0) > 0 and not work.kv_preallocated),
            ("offload=nvme", spec.offload.device == "cpu"),
            ("quant=int4", spec.quant.mode == "none"),
            ("pin=false", bool(spec.pin) and spec.offload.device == "cpu"),
            ("a smaller batch", work.kv_offloaded)) if applies]
        held = ", ".join(f"{name} {nbytes / GIB:.1f}" for name, nbytes in parts.items() if nbytes >= GIB / 20)
        problems.append(ConfigError(
            "offload", spec.offload.device,
            f"a setting whose host memory fits: predicted peak host RSS {prediction.peak_host_bytes / GIB:.1f} GiB "
            f"({held} GiB) exceeds the {host / GIB:.1f} GiB {limit} (hardware.host_memory_gib); "
            f"try {', '.join(ways) or 'a smaller model'}"))
    if spec.offload.device == "nvme" and here:
        free = machine.free_disk_bytes(spec.offload.nvme_path)
        if free is not None and prediction.nvme_bytes > free:
            problems.append(ConfigError(
                "offload.nvme_path", spec.offload.nvme_path,
                f"a directory with room for the swapped weights: {prediction.nvme_bytes / GIB:.1f} GiB needed, "
                f"{free / GIB:.1f} GiB free there; free space, choose another disk, or quant=int4"))
    return tuple(problems)


def _device_problems(spec: JobSpec, hardware: Hardware, found: Tuple[ConfigError, ...]) -> Tuple[ConfigError, ...]:
    """``devices`` beyond the GPUs of the hardware planned for, unless the environment check (``found``)
    already refused them here."""
    if hardware.gpu_count is None or spec.devices <= hardware.gpu_count or any(p.key == "devices" for p in found):
        return ()
    where = "this machine has" if hardware.name == "auto" else f"hardware={hardware.name} has"
    return (ConfigError("devices", spec.devices,
                        f"at most {hardware.gpu_count}: {where} {hardware.gpu_count} GPU(s) (hardware.gpu_count), "
                        f"one rank per GPU"),)


def plan_job(spec: JobSpec, cuda: bool, here: bool = True) -> JobPlan:
    """Plan the job ``spec`` for the hardware it names (``hardware``; ``auto`` is this machine; ``cuda``:
    whether a CUDA device is usable here).

    What the hardware lacks
    (GPU memory for the predicted peak, host memory) goes into ``problems``, and so, with ``here`` (the job
    would run on this machine), what this machine lacks: CUDA, libaio, the NVMe directory or its free
    space, the GPU of a hardware preset. ``here=False`` plans for a preset's machine instead (zi-plan).
    """
    preflight.prefer_cpu_accelerator(cuda)  # before anything imports DeepSpeed
    facts = model_facts(spec.model.arch, spec.cache_dir)
    hw = machine.hardware(spec, cuda)
    device_bytes = hw.gpu_memory_bytes if (cuda or hw.name != "auto") else None
    # Planned for this machine without CUDA, DeepSpeed's CPU accelerator runs the job in host memory.
    on_cpu = not cuda and hw.name == "auto"
    dequant = preflight.kv_dequant_kernel(spec.kvcache.dequant, on_cpu, cuda and here)  # auto resolved
    spec = dataclasses.replace(spec, kvcache=dataclasses.replace(spec.kvcache, dequant=dequant))
    work = dataclasses.replace(workload(spec), on_cpu=on_cpu, imports_triton=on_cpu and preflight.triton_installed())
    budget = budget_bytes(spec, device_bytes)
    planned = residency(spec, work, facts, budget)
    if spec.kvcache.gpu_layers == "auto":
        spec, work, planned = _keep_kv_layers(spec, work, facts, planned, budget, hw)
    prediction = predict_job(work, facts, planned, hw)
    mismatch = machine.hardware_problem(hw, cuda) if here else None
    environment = tuple(preflight.environment_problems(spec, cuda)) if here else ()
    devices = (*environment, *_device_problems(spec, hw, environment))
    # Memory predicted for more ranks than can run says nothing more: the one problem is ``devices``.
    memory = () if any(p.key == "devices" for p in devices) else (
        *_over_budget(spec, planned, budget), *_host_problems(spec, hw, work, facts, planned, prediction, here))
    problems = (*devices, *memory,
                *((ConfigError("hardware", hw.name, mismatch),) if mismatch else ()))
    ds_config = dsconfig.build_ds_config(spec, facts, planned)
    return JobPlan(spec, ds_config, planned, budget, problems, hw, prediction, facts)


def ready(spec: JobSpec, cuda: bool) -> JobPlan:
    """The plan of a job about to run here: :func:`plan_job`, refused naming every problem, and the dtype
    checked with DeepSpeed's accelerator (which a dry run need not import) first: a GPU model on a CPU
    machine is told to use a small model, before what its size would need of this host."""
    plan = plan_job(spec, cuda)
    preflight.check_dtype_supported(plan.spec, cuda)
    plan.check_runnable()
    return plan


def sweep_plan(spec: JobSpec, cuda: bool, gpus: Optional[int] = None,
               here: bool = True) -> Tuple[Optional[ConfigError], Optional[JobPlan]]:
    """What a sweep's parent knows of a job before starting it: (why it would be refused before loading, its
    plan). The refusal is ``devices`` beyond the ``gpus`` the sweep hands out (None: no GPUs to hand out, ranks
    run on the CPU), or the problems of its plan (one error), made the way the job itself makes it; the plan is
    None when refused. ``here=False`` plans for the hardware the job names without this machine's checks (a
    SLURM sweep's driver, whose jobs run on other nodes). Lets a sweep's parent refuse jobs without starting
    their processes, plan the sweep's time (:attr:`JobPlan.predicted_job_s`) and size their requests."""
    plan = plan_job(spec, cuda, here)
    if gpus is not None and spec.devices > gpus:
        return ConfigError("devices", spec.devices,
                           f"at most {gpus}: this sweep has {gpus} GPU(s) (hydra.launcher.gpus, else "
                           f"CUDA_VISIBLE_DEVICES or every GPU nvidia-smi lists), one per rank"), None
    return (every_problem(plan.problems), None) if plan.problems else (None, plan)
