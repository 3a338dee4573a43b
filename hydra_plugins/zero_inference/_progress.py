"""What the process-per-job launcher prints of each job: one line per finished job, named by what the sweep
varies (its fixed overrides are said once, in the sweep's summary), pointing at the job's log files for the
details. A job's own output goes to ``output.log`` in its folder unless ``verbose=true``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, List, Optional, Sequence, Set

from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.zero_inference._sweep_plan import TimePlan, label, outcome
from zi_app.run.progress import human_seconds

OUTPUT_LOG = "output.log"  # in a job's folder: everything its process printed, unless verbose=true


class JobProcessError(RuntimeError):
    """A job's process ended without sending back a result.

    ``failure_kind`` is ``killed`` when a signal ended it, ``error`` when it exited on its own.
    """

    failure_kind = "error"


def log_files(output_dir: str) -> List[str]:
    """The job's log files: Hydra's job log (``<job name>.log``) and what its process printed (``output.log``)."""
    return sorted(str(path) for path in Path(output_dir).glob("*.log"))


def _where(ret: JobReturn, output_dir: str) -> str:
    """Where a failed job's details are: its log files (a traceback, or what a dying process printed)."""
    logs = log_files(output_dir)
    if isinstance(ret._return_value, JobProcessError):  # no traceback: it died; its output says how far it got
        logs = [log for log in logs if log.endswith(OUTPUT_LOG)]
        return f"its output: {', '.join(logs)}" if logs else f"its files: {output_dir}"
    return f"traceback in {', '.join(logs)}" if logs else ""


def failure_line(idx: int, overrides: Sequence[str], output_dir: str, ret: JobReturn) -> str:
    """One line for a failed job: its number, what the sweep varies, its error, and where its details are."""
    where = _where(ret, output_dir)
    return f"job #{idx} ({label(overrides)}) {outcome(ret, '')}" + (f"; {where}" if where else "")


class Progress:
    """Prints one line per finished job: ``[k/N] #idx batch=8: outcome (seconds, GPU) · about T left``,
    the time left from the plan of the jobs not finished yet."""

    def __init__(self, done: int, total: int, result_label: str, plan: TimePlan) -> None:
        self.done, self.total, self.result_label, self.plan = done, total, result_label, plan
        self.finished: Set[int] = set()
        self.lock = threading.Lock()

    def job_ended(self, job: Any, ret: JobReturn, seconds: float, gpu: Optional[str]) -> None:
        """Print the line of ``job`` (the launcher's Job), which ended with ``ret`` after ``seconds``."""
        with self.lock:
            self.done += 1
            where = f", GPU {gpu}" if gpu is not None else ""
            details = _where(ret, job.output_dir) if ret.status == JobStatus.FAILED else ""
            where += f"; {details}" if details else ""
            self.finished.add(job.idx)
            left = self.plan.left(self.finished)
            scope = "" if self.plan.name == "sweep" else f" in {self.plan.name}"
            eta = f" · about {human_seconds(left)} left{scope}" if left is not None else ""
            print(f"[{self.done}/{self.total}] #{job.idx} {label(job.overrides)}: {outcome(ret, self.result_label)} "
                  f"({seconds:.1f} s{where})" + eta, flush=True)
