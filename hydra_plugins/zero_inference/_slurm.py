"""The ``zi_slurm`` launcher's work, on the driver's side: compose and plan every job, refuse in the driver what
the plan refuses (a FAILED run, no SLURM allocation) and, in one line with exit status 2, a request no partition
can run; submit each remaining job as its own SLURM job sized by its plan; wait for all of them, settling a job
that SLURM ended without a result; and when the sweep is stopped (Ctrl-C, SIGTERM, or an error), cancel its
jobs with ``scancel`` so that they close their runs, then mark any run still open ``killed``.

A job runs on its node as ``python -m hydra_plugins.zero_inference._slurm_job FOLDER`` (:class:`Executor`),
which runs submitit's job and then exits non-zero for a failed job, so that ``sacct`` says FAILED.
"""

from __future__ import annotations

import getpass
import logging
import pickle
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from submitit.slurm.slurm import SlurmExecutor

from hydra_plugins.zero_inference import _slurm_request as sizing
from hydra_plugins.zero_inference._job import log_failure, portable
from hydra_plugins.zero_inference._launcher import (JOB_DIR_KEY, JOB_SUBDIR_KEY, Job, compose, dead_job_return,
                                                    refused_job_return, reported)
from hydra_plugins.zero_inference._progress import JobProcessError, Progress
from hydra_plugins.zero_inference._sweep_plan import TimePlan, plan_jobs
from zi_app.config.checks import EXIT_INVALID_CONFIG, ConfigError
from zi_app.record.redaction import redact_overrides

log = logging.getLogger(__name__)

JOB_MODULE = "hydra_plugins.zero_inference._slurm_job"
POLL_S = 1.0  # how often the driver looks for finished jobs' result files
QUEUE_POLL_S = 5.0  # how often it asks squeue which jobs are still queued or running
RESULT_GRACE_S = 15.0  # a job gone from squeue whose result file is not there yet (a shared filesystem's delay)
CANCEL_WAIT_S = 90.0  # a stopped sweep waits this long for its cancelled jobs to close their runs
# sbatch options the launcher passes as given (the request's own are sized per job, ours are consumed here).
PASSED = ("partition", "qos", "comment", "constraint", "exclude", "gres", "account", "additional_parameters",
          "setup", "stderr_to_stdout")

exit_status = 0  # in a job's process: the status it exits with (1 for a failed job), read by _slurm_job


class Executor(SlurmExecutor):
    """submitit's SLURM executor, running each job through :mod:`._slurm_job` instead of submitit's own entry."""

    @property
    def _submitit_command_str(self) -> str:
        return " ".join([self.python, "-u -m", JOB_MODULE, shlex.quote(str(self.folder))])


@dataclass
class SlurmTask:
    """The callable submitit pickles for one job and calls on its node: Hydra's ``run_job`` on the job's config,
    as the process-per-job launcher's job process does."""

    task_function: Any
    hydra_context: Any
    config: Any
    state: Any

    def __call__(self) -> JobReturn:
        global exit_status
        Singleton.set_state(self.state)
        setup_globals()
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config,
                      job_dir_key=JOB_DIR_KEY, job_subdir_key=JOB_SUBDIR_KEY)
        if ret.status == JobStatus.FAILED:
            log_failure(ret._return_value, self.config.hydra.job.num)  # the public property raises when failed
            exit_status = 1
        return pickle.loads(portable(ret))  # a value the driver can unpickle


def queue_states(ids: Sequence[str]) -> Optional[Dict[str, str]]:
    """{job id: state} of those of ``ids`` still in SLURM's queue (pending, running, completing); None when
    squeue cannot say (the driver then concludes nothing)."""
    try:
        out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = dict(line.strip().split("|", 1) for line in out.stdout.splitlines() if "|" in line)
    return {job_id: states[job_id] for job_id in ids if job_id in states}


def ended_without_result(job: Job, slurm_job: Any, why: str, kind: str = "killed") -> JobReturn:
    """A FAILED JobReturn for a SLURM job that left no result: ``why`` says what happened."""
    ret = dead_job_return(job, 0)
    error = JobProcessError(f"SLURM job {slurm_job.job_id} {why}; its log: {slurm_job.paths.stderr}")
    error.failure_kind = kind
    ret.return_value = error
    return ret


@dataclass
class Submitted:
    """A job submitted to SLURM: the job, submitit's handle, when it was submitted, when it left the queue."""

    job: Job
    slurm: Any
    start: float
    left_queue: Optional[float] = None
    ended: bool = False  # its JobReturn was collected

    def result(self, queued: Optional[Dict[str, str]]) -> Optional[JobReturn]:
        """The job's JobReturn once it has ended, else None."""
        if self.slurm.paths.result_pickle.exists():
            try:
                return self.slurm.result()
            except Exception as error:  # noqa: BLE001 - submitit's own failure around the job (its trace)
                return ended_without_result(self.job, self.slurm, f"failed outside the job: {str(error)[-300:]}",
                                            "error")
        if queued is not None and self.slurm.job_id not in queued and self.left_queue is None:
            self.left_queue = time.monotonic()
        if self.left_queue is not None and time.monotonic() - self.left_queue > RESULT_GRACE_S:
            return ended_without_result(self.job, self.slurm, "ended without a result (killed: by its memory "
                                        "limit, scancel, a node failure, or SIGKILL)")
        return None


def refuse(message: str) -> None:
    """Stop the sweep before anything is submitted: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INVALID_CONFIG)


def check_partitions(jobs: Sequence[Job], requests: Dict[int, sizing.Request]) -> None:
    """Refuse the sweep when some job asks for more than any node of its partitions offers (``sinfo``): such a
    job would stay PENDING forever. Nothing is checked where sinfo cannot say."""
    nodes = sizing.partitions()
    if nodes is None:
        print("warning: sinfo did not answer: the SLURM requests are submitted unchecked", file=sys.stderr)
        return
    for job in jobs:
        req = requests.get(job.idx)
        why = None if req is None else sizing.unfit(req, nodes)
        if why:
            refuse(f"hydra.launcher: job #{job.idx} ({redact_overrides(filter_overrides(job.overrides))}) asks "
                   f"SLURM for {req.describe()}, which no partition can run: {why}; lower hydra.launcher."
                   f"mem_gb/cpus_per_task/gpus_per_node/timeout_min, the job's devices, or name another "
                   f"hydra.launcher.partition")


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Run the batch as SLURM jobs; return JobReturns in job order (see the module's docstring)."""
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    params = dict(launcher.params)
    delay, warning = sizing.signal_delay(params)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = [compose(launcher, overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
    refused, plans = plan_jobs(jobs, 0, here=False)  # the nodes are not this machine: no checks of it
    try:
        requests = {job.idx: sizing.request(params, plans.get(job.idx)) for job in jobs if job.idx not in refused}
    except ConfigError as error:
        refuse(f"invalid config: {error}")
    check_partitions(jobs, requests)
    progress = Progress(initial_job_idx, initial_job_idx + len(jobs), launcher.result_label,
                        TimePlan({}, 1, launcher.batch_name))  # no time left: the queue decides when jobs run
    returns: Dict[int, JobReturn] = {}
    for job in jobs:
        if job.idx in refused:  # recorded as its process would have: a FAILED run, and no SLURM allocation
            returns[job.idx] = refused_job_return(job, refused[job.idx])
            launcher.hydra_context.callbacks.on_job_end(config=job.config, job_return=returns[job.idx])
            progress.job_ended(job, returns[job.idx], 0.0, None)
    base = {key: params[key] for key in PASSED if params.get(key) is not None}
    state = Singleton.get_state()
    submitted: Dict[int, Submitted] = {}
    try:
        for job in jobs:
            if job.idx in refused:
                continue
            req = requests[job.idx]
            task = SlurmTask(launcher.task_function, launcher.hydra_context, job.config, state)
            try:
                # An executor per job: its parameters are merged, and a job's request must not inherit another's.
                executor = Executor(params["submitit_folder"], max_num_timeout=params.get("max_num_timeout", 0))
                executor.update_parameters(**base, **req.sbatch(), signal_delay_s=delay)
                handle = executor.submit(task)
            except Exception as error:  # noqa: BLE001 - sbatch's refusal (or no srun here), with its own message
                refuse(f"hydra.launcher: job #{job.idx} ({req.describe()}) could not be submitted: "
                       f"{str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__}")
            submitted[job.idx] = Submitted(job, handle, time.monotonic())
            log.info("\t#%d : %s (SLURM job %s %s: %s)", job.idx, redact_overrides(filter_overrides(job.overrides)),
                     handle.job_id, req.name, req.describe())
        wait(launcher, submitted, returns, progress)
    except BaseException as error:
        stop(launcher, submitted, error)
        raise
    return [reported(job, returns[job.idx]) for job in jobs]


def wait(launcher: Any, submitted: Dict[int, Submitted], returns: Dict[int, JobReturn], progress: Progress) -> None:
    """Wait for every submitted job, collecting its JobReturn as it ends; a job that left no result (SLURM
    killed it) is told to the callbacks here, its own ``on_job_end`` having never run."""
    asked = 0.0
    while any(idx not in returns for idx in submitted):
        queued = None
        if time.monotonic() - asked > QUEUE_POLL_S:
            queued, asked = queue_states([s.slurm.job_id for i, s in submitted.items() if i not in returns]), \
                time.monotonic()
        for idx, entry in submitted.items():
            ret = None if idx in returns else entry.result(queued)
            if ret is None:
                continue
            returns[idx], entry.ended = ret, True
            if isinstance(ret._return_value, JobProcessError):
                launcher.hydra_context.callbacks.on_job_end(config=entry.job.config, job_return=ret)
            progress.job_ended(entry.job, ret, time.monotonic() - entry.start, None)
        time.sleep(POLL_S)


def stop(launcher: Any, submitted: Dict[int, Submitted], error: BaseException) -> None:
    """The sweep stops (a signal, or an error): cancel its SLURM jobs still queued or running, wait for them to
    close their own runs (``scancel`` sends SIGTERM, which a job records as ``killed``), then mark ``killed``
    the runs of the jobs that had started and could not close theirs. A job cancelled before it started
    opens no run: the sweep's summary counts it among those that never ran."""
    open_jobs = [s for s in submitted.values() if not s.ended and not s.slurm.paths.result_pickle.exists()]
    if not open_jobs:
        return
    signum = getattr(error, "signum", signal.SIGINT if isinstance(error, KeyboardInterrupt) else None)
    why = f"its sweep was stopped by {signal.Signals(signum).name}" if signum else \
        f"its sweep failed ({type(error).__name__})"
    ids = [s.slurm.job_id for s in open_jobs]
    states = queue_states(ids) or {}
    print(f"Cancelling {len(ids)} SLURM job(s) of this sweep: {' '.join(ids)}", file=sys.stderr, flush=True)
    subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        left = queue_states(ids)
        if left == {}:
            break
        time.sleep(POLL_S)
    for entry in open_jobs:
        if states.get(entry.slurm.job_id) == "PENDING" or entry.slurm.paths.result_pickle.exists():
            continue
        ret = ended_without_result(entry.job, entry.slurm, f"was cancelled: {why}")
        try:
            launcher.hydra_context.callbacks.on_job_end(config=entry.job.config, job_return=ret)
        except BaseException as settling:  # noqa: BLE001 - the next command on the store closes it instead
            print(f"warning: could not record job #{entry.job.idx} as killed: {type(settling).__name__}",
                  file=sys.stderr, flush=True)
