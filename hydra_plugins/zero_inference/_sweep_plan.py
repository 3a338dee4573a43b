"""A sweep's plan, made in the driver before any job starts: which jobs their plans refuse (they get a FAILED
run and no process), how long the others are planned to take, and the outcome words of a finished job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Set, Tuple

from hydra.core.utils import JobReturn, JobStatus, filter_overrides

from zi_app.record.redaction import redact_overrides
from zi_app.record.runs import run_name
from zi_app.run.progress import human_seconds


def plan_jobs(jobs: Sequence[Any], gpus: int, here: bool = True) -> Tuple[dict, dict]:
    """Plan every job in the driver first: ({job idx: why it will be refused}, {job idx: its JobPlan}) for the
    zero-inference app's jobs: refused are those it would refuse before loading, or whose ``devices`` exceed
    the ``gpus`` the sweep has (when it has any), printed with their reasons. Other apps' jobs are never
    refused and have no plan. ``here=False``: the jobs run elsewhere (SLURM nodes), planned for the hardware
    they name without this machine's checks."""
    import torch

    from zi_app.config.checks import ConfigError
    from zi_app.config.spec import validate
    from zi_app.plan.job import sweep_plan

    refused, plans = {}, {}
    cuda = torch.cuda.is_available()
    for job in jobs:
        if not all(key in job.config for key in ("model", "offload", "quant", "memory")) or job.config.get("dry_run"):
            continue  # another app's job, or a dry run (which only warns): neither refused nor planned
        try:
            error, planned = sweep_plan(validate(job.config), cuda, gpus or None, here)
        except ConfigError as invalid:
            error, planned = invalid, None
        if error is not None:
            refused[job.idx] = error
        else:
            plans[job.idx] = planned
    if refused:
        print(f"Planned {len(jobs)} jobs: {len(refused)} will be refused, without starting their processes:",
              flush=True)
        for job in jobs:
            if job.idx in refused:
                print(f"  #{job.idx} {label(job.overrides)}: {refused[job.idx]}", flush=True)
    return refused, plans


def label(overrides: Sequence[str]) -> str:
    """A job as its lines name it: the values of the keys the sweep varies (``batch=8 pin=true``), else all
    its overrides; secrets masked."""
    return run_name(redact_overrides(filter_overrides(list(overrides))), fallback="(no overrides)")


@dataclass
class TimePlan:
    """The planned seconds of the jobs one launch runs (None: not planned), the slots they share, and what
    the launch is to the user (``sweep``, or an adaptive sweep's ``round 2``)."""

    seconds: Dict[int, Optional[float]]
    slots: int
    name: str

    def left(self, finished: Set[int]) -> Optional[float]:
        """Planned seconds until the unfinished jobs are done: their sum over the slots, at least the longest
        of them; None when none of them has a plan."""
        todo = [s for idx, s in self.seconds.items() if idx not in finished and s is not None]
        return max(sum(todo) / self.slots, max(todo)) if todo else None

    def start_line(self) -> str:
        """``sweep: 8 jobs to run, about 12 min (planned)``; no time where no job's speed is predicted."""
        count = len(self.seconds)
        line = f"{self.name}: {count} job{'' if count == 1 else 's'} to run"
        total = self.left(set())
        if total is None:
            return line
        unplanned = sum(s is None for s in self.seconds.values())
        return line + f", about {human_seconds(total)} (planned" + (f"; {unplanned} without a plan)" if unplanned
                                                                   else ")")


def outcome(ret: JobReturn, label: str) -> str:
    """``COMPLETED 12.34 tokens/s`` or ``FAILED <error type>: <first line of its message>``."""
    value = ret._return_value  # the public property raises for a failed job
    if ret.status == JobStatus.COMPLETED:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"COMPLETED {value:.2f} {label}"
        return "COMPLETED"
    message = str(value).strip().splitlines()
    return f"FAILED {type(value).__name__}: {message[0] if message else ''}"
