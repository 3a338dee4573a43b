"""What ``hydra/launcher=zi_slurm`` asks SLURM for, job by job: sized from the job's plan (GPUs = ``devices``,
memory = the predicted host peak with a margin, CPUs per GPU from the preset), named by what the job runs, checked
against the partitions ``sinfo`` lists before anything is submitted, with ``signal_delay_s`` kept below the time
limit. Pure but for :func:`partitions`, which runs ``sinfo``.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from zi_app.config.checks import ConfigError

GIB = 2**30
AUTO = "auto"


@dataclass(frozen=True)
class Request:
    """One job's SLURM request: GPUs and memory (GiB) per node, CPUs, minutes, name, partition(s)."""

    gpus: int
    mem_gb: Optional[int]
    cpus: Optional[int]
    minutes: int
    name: str
    partition: Optional[str]

    def describe(self) -> str:
        """``2 GPUs, 94 GB, 16 CPUs, 120 min``: what sbatch is asked for."""
        parts = [f"{self.gpus} GPU{'s' * (self.gpus != 1)}" if self.gpus else "no GPU"]
        parts += [f"{self.mem_gb} GB"] if self.mem_gb is not None else []
        parts += [f"{self.cpus} CPU{'s' * (self.cpus != 1)}"] if self.cpus is not None else []
        return ", ".join(parts + [f"{self.minutes} min"])

    def sbatch(self) -> Dict[str, Any]:
        """The request in submitit's SlurmExecutor's own parameter names."""
        params: Dict[str, Any] = {"job_name": self.name, "time": self.minutes}
        params.update({"gpus_per_node": self.gpus} if self.gpus else {})
        params.update({"mem": f"{self.mem_gb}GB"} if self.mem_gb is not None else {})
        params.update({"cpus_per_task": self.cpus} if self.cpus is not None else {})
        return params


def _count(key: str, value: Any, allowed: str, auto: bool = True) -> Optional[Any]:
    """``value`` of launcher key ``key``: AUTO, None, or a non-negative number; else a one-line refusal."""
    if value is None or (auto and value == AUTO):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise ConfigError(f"hydra.launcher.{key}", value, allowed)
    return value


def job_name(spec) -> str:
    """``zi:opt-30b:b24``, ``zi:opt-66b:int4:b16:d2``: the model, its quantization, batch and devices, as
    ``squeue`` shows them (no spaces, no slashes: a checkpoint path gives its last part)."""
    model = re.sub(r"[^\w.+-]", "_", spec.model.name.rstrip("/").split("/")[-1])
    quant = [] if spec.quant.mode == "none" else [f"int{spec.quant.bits}" + ("-post" * (spec.quant.mode == "post"))]
    devices = [f"d{spec.devices}"] if spec.devices > 1 else []
    return ":".join(["zi", model, *quant, f"b{spec.batch}", *devices])


def request(params: Dict[str, Any], plan=None) -> Request:
    """The request of one job from the launcher's ``params`` and the job's plan (None: not our app's job, or a
    dry run: the launcher's figures, a generic name). ``auto`` figures come from the plan: GPUs = ``devices``,
    memory = predicted host peak x ``mem_margin`` (GiB, rounded up), CPUs = ``cpus_per_gpu`` x GPUs."""
    gpus = _count("gpus_per_node", params.get("gpus_per_node"), "auto (the job's devices), a count, or null/0 for "
                  "CPU nodes")
    mem = _count("mem_gb", params.get("mem_gb"), "auto (the plan's host peak x mem_margin), GiB, or null (the "
                 "node's default)")
    cpus = _count("cpus_per_task", params.get("cpus_per_task"), "auto (cpus_per_gpu x GPUs), a count, or null")
    margin = _count("mem_margin", params.get("mem_margin", 1.25), "a factor of at least 1", auto=False)
    per_gpu = _count("cpus_per_gpu", params.get("cpus_per_gpu", 8), "a count of at least 1", auto=False)
    if margin is None or margin < 1:
        raise ConfigError("hydra.launcher.mem_margin", margin, "a factor of at least 1 over the plan's host peak")
    if per_gpu is None or per_gpu < 1:
        raise ConfigError("hydra.launcher.cpus_per_gpu", per_gpu, "a count of at least 1")
    devices = plan.spec.devices if plan is not None else 1
    gpus = devices if gpus == AUTO else int(gpus or 0)
    if mem == AUTO:
        mem = math.ceil(plan.predicted_peak_host_bytes * margin / GIB) if plan is not None else None
    cpus = int(per_gpu) * max(gpus, devices, 1) if cpus == AUTO else cpus
    name = job_name(plan.spec) if plan is not None else str(params.get("name") or "zi")
    return Request(gpus, None if mem is None else int(mem), None if cpus is None else int(cpus),
                   int(params.get("timeout_min", 60)), name, params.get("partition"))


def signal_delay(params: Dict[str, Any]) -> Tuple[int, Optional[str]]:
    """SLURM warns a job ``signal_delay_s`` before its time limit (the job then records its timeout and ends):
    kept at most half the limit, with a warning when that lowers it; a delay as long as the limit would warn
    the job as it starts and end even a job that would have finished."""
    delay, limit_s = int(params.get("signal_delay_s", 120)), int(params.get("timeout_min", 60)) * 60
    if delay <= limit_s // 2:
        return delay, None
    return limit_s // 2, (f"warning: hydra.launcher.signal_delay_s={delay} is not below half the time limit "
                          f"(timeout_min={limit_s // 60}: {limit_s} s): SLURM would warn jobs too early to "
                          f"finish; using {limit_s // 2} s")


@dataclass(frozen=True)
class Node:
    """One node of one partition as ``sinfo -N`` lists it."""

    partition: str
    default: bool
    cpus: int
    mem_gb: float
    gpus: int
    minutes: Optional[int]  # the partition's time limit; None: none


def _minutes(text: str) -> Optional[int]:
    """SLURM's time limit (``infinite``, ``1-02:00:00``, ``2:00:00``, ``30:00``, ``45``) in minutes."""
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, clock = text.rpartition("-")
    fields = [int(f) for f in clock.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(fields)) + fields) if len(fields) > 1 else (0, fields[0], 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + (seconds > 0)


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES (``gpu:4``, ``gpu:h100:8(S:0-1)``, ``(null)``)."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))


def partitions(sinfo: Sequence[str] = ("sinfo",)) -> Optional[List[Node]]:
    """Every node of every partition that is up, from ``sinfo``; None when sinfo cannot say."""
    try:
        out = subprocess.run([*sinfo, "-h", "-N", "-o", "%P|%a|%c|%m|%G|%l"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    nodes = []
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6 or fields[1] != "up":
            continue
        name, cpus, memory = fields[0], fields[2].rstrip("+"), fields[3].rstrip("+")
        nodes.append(Node(name.rstrip("*"), name.endswith("*"), int(cpus), int(memory) / 1024, _gpus(fields[4]),
                          _minutes(fields[5])))
    return nodes


def unfit(req: Request, nodes: Sequence[Node]) -> Optional[str]:
    """Why no node of the partitions ``req`` may use can run it (None: one can): what the biggest offers."""
    names = [p.strip() for p in req.partition.split(",")] if req.partition else None
    usable = [n for n in nodes if (n.partition in names if names else n.default)]
    if not usable:
        where = f"partition {req.partition}" if names else "a default partition"
        return f"sinfo lists no node up in {where}"
    for node in usable:
        if req.gpus <= node.gpus and (req.mem_gb or 0) <= node.mem_gb and (req.cpus or 0) <= node.cpus \
                and (node.minutes is None or req.minutes <= node.minutes):
            return None
    offered = "; ".join(sorted({f"{n.partition}: {n.gpus} GPUs, {n.mem_gb:.0f} GB, {n.cpus} CPUs, "
                                f"{'no time limit' if n.minutes is None else f'{n.minutes} min'}" for n in usable}))
    return f"no node offers that ({offered})"
