"""The process-per-job launcher's work, on the driver's side: compose each job, run it in a new process
(``_job``), collect its JobReturn, and print a progress line per job.

The job travels to its process as a cloudpickle of the task function, the job's composed config, the
Hydra context and Hydra's singletons; the JobReturn travels back the same way. A process that dies
without sending one back (a signal, the kernel's OOM killer, a hard crash) becomes a FAILED JobReturn
holding a :class:`JobProcessError`, Hydra's ``on_job_end`` callbacks are told about it, and the sweep
goes on with the next job. When the sweep itself stops (Ctrl-C, ``kill``), the signal is passed on to the
running jobs, so that they close their runs, and no other job starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Set

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.zero_inference._progress import OUTPUT_LOG, JobProcessError, Progress, failure_line
from hydra_plugins.zero_inference._sweep_plan import TimePlan, label, plan_jobs
from zi_app.config.checks import EXIT_INVALID_CONFIG

log = logging.getLogger(__name__)

JOB_MODULE = "hydra_plugins.zero_inference._job"
# The overrides of every job this process launched (a process started, or refused by its plan), for the sweep's
# end (sweep_callback.py): a job here with no run in the store ran and could not be recorded.
LAUNCHED: List[List[str]] = []
JOB_DIR_KEY = "hydra.sweep.dir"
JOB_SUBDIR_KEY = "hydra.sweep.subdir"


class JobError(RuntimeError):
    """A job's failure whose exception could not travel back from the job's process as itself."""


class JobFailed(CompactHydraException):
    """A failed job as the sweeper reports it when the sweep ends: one line naming the job and its error.

    Hydra prints a compact exception as its message alone, where it would print a traceback of its own
    frames for the job's error; the job's traceback is in its log file. ``error`` is the job's own error.
    """

    exit_status = 1  # the app's entry point prints the message as one ``error:`` line and exits with this

    def __init__(self, message: str, error: BaseException) -> None:
        super().__init__(message)
        self.error = error


class LauncherSettingError(CompactHydraException):
    """A launcher setting that cannot work, named with its value and what is allowed, before any job starts."""

    exit_status = EXIT_INVALID_CONFIG


def job_interpreter(python: Optional[str]) -> List[str]:
    """The command that starts a job's Python: ``hydra.launcher.python`` split as a shell would, or this
    interpreter; :class:`LauncherSettingError` where its first word is not an executable."""
    if python is None:
        return [sys.executable]
    try:
        words = shlex.split(python)
    except ValueError as error:
        words, why = [], f"it does not split as a shell would ({error})"
    else:
        why = "it is empty" if not words else f"{words[0]!r} is not an executable file nor one on PATH"
    if words and shutil.which(words[0]) is not None:
        return words
    raise LauncherSettingError(f"invalid config: hydra.launcher.python={python!r} is not allowed: {why}; null (this "
                               f"interpreter, {sys.executable}) or a command that runs Python, e.g. 'numactl "
                               f"--cpunodebind=0 --membind=0 python'")


class QuietJobReturn(JobReturn):
    """A failed job's JobReturn whose ``return_value`` raises without first writing Hydra's "Error executing
    job with overrides" line: the launcher's line for the job already named it and its error."""

    @property
    def return_value(self) -> Any:
        if self.status == JobStatus.COMPLETED:
            return self._return_value
        raise self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


@dataclass
class Job:
    """One job of the batch: its number, its overrides and its composed config (output dir resolved)."""

    idx: int
    overrides: List[str]
    config: DictConfig

    @property
    def output_dir(self) -> str:
        return str(self.config.hydra.runtime.output_dir)


def job_devices(job: Job) -> int:
    """The GPUs ``job`` asks for: its ``devices`` (a zero-inference job spanning several), else one."""
    devices = job.config.get("devices")
    return devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 1 else 1


class GpuPool:
    """The sweep's GPUs, handed to jobs as sets: a job taking N waits until N are free at once, while jobs
    that fit in what is free run beside it."""

    def __init__(self, gpus: Sequence[str]) -> None:
        self.gpus = list(gpus)
        self.free = list(gpus)
        self.changed = threading.Condition()

    def take(self, count: int) -> List[str]:
        """Wait until ``count`` GPUs are free and take them (the first free, in the sweep's order)."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.free) >= count)
            taken, self.free = self.free[:count], self.free[count:]
            return taken

    def give_back(self, gpus: Sequence[str]) -> None:
        """Return GPUs taken with :meth:`take`, waking the jobs waiting for them."""
        with self.changed:
            back = set(self.free) | set(gpus)
            self.free = [gpu for gpu in self.gpus if gpu in back]
            self.changed.notify_all()


def compose(launcher: Any, overrides: Sequence[str], idx: int) -> Job:
    """The job's config as its process will see it, with ``hydra.runtime.output_dir`` already resolved
    (the same path ``run_job`` computes), so the driver knows where a dead job kept its files."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config):
        config.hydra.job.id = idx
        config.hydra.job.num = idx
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(config)  # ${hydra:...} in the output dir resolves against this job
    try:
        output_dir = os.path.join(str(OmegaConf.select(config, JOB_DIR_KEY)), str(OmegaConf.select(config, JOB_SUBDIR_KEY)))
    finally:
        hydra_config.cfg = previous
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    return Job(idx=idx, overrides=list(overrides), config=config)


def describe_exit(returncode: int) -> JobProcessError:
    """The error of a job process that exited with ``returncode`` without sending back a result; a status
    above 128 is, by the shells' convention, a process that stopped itself on signal ``status - 128``."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else f"signal {-returncode}"
        cause = " (the kernel's out-of-memory killer, or a kill from outside)" if -returncode == signal.SIGKILL else ""
        error = JobProcessError(f"the job's process was killed by {name}{cause} before it could return a result")
        error.failure_kind = "killed"
        return error
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        error = JobProcessError(f"the job's process stopped on {signal.Signals(returncode - 128).name} (exit status "
                                f"{returncode}) before it could return a result")
        error.failure_kind = "killed"
        return error
    return JobProcessError(f"the job's process exited with status {returncode} without returning a result "
                           f"(its output above says why)")


def dead_job_return(job: Job, returncode: int) -> JobReturn:
    """A FAILED JobReturn standing for a job whose process died."""
    task_cfg = OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"])
    ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=job.config, working_dir=job.output_dir,
                    task_name=str(job.config.hydra.job.name), status=JobStatus.FAILED)
    ret.return_value = describe_exit(returncode)
    return ret


def refused_job_return(job: Job, error: BaseException) -> JobReturn:
    """A FAILED JobReturn for a job refused by the plan made before launching (no process started)."""
    task_cfg = OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"])
    ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=job.config, working_dir=job.output_dir,
                    task_name=str(job.config.hydra.job.name), status=JobStatus.FAILED)
    ret.return_value = error
    return ret


@dataclass
class Children:
    """The job processes running now, so that a signal that stops the sweep reaches them too (Ctrl-C in a
    terminal reaches the whole process group; ``kill PID`` only the driver)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    running: Set[subprocess.Popen] = field(default_factory=set)
    stopping: bool = False

    def run(self, args: List[str], env: dict, output: Optional[Path] = None) -> Optional[int]:
        """Run a job process to its end and return its exit status; None, and no process, once stopping. Its
        stdout and stderr go to the file ``output`` when given, else to the sweep's own."""
        with self.lock:
            if self.stopping:
                return None
            if output is not None:
                output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "w") if output is not None else contextlib.nullcontext() as sink:
                process = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT if sink else None)
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)

    def stop(self, signum: int) -> None:
        """Send ``signum`` to every running job and start no other."""
        with self.lock:
            self.stopping = True
            for process in self.running:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)


class SweepStopped(RuntimeError):
    """A job not started because the sweep is stopping."""


def run_in_process(launcher: Any, job: Job, gpu: Optional[str], state: Any, workdir: Path,
                   children: Children, python: List[str]) -> JobReturn:
    """Run ``job`` in a new ``python -m hydra_plugins.zero_inference._job`` process (``python``: the command
    that starts it) and return its JobReturn."""
    payload, result = workdir / f"job{job.idx}.pkl", workdir / f"job{job.idx}.result.pkl"
    with open(payload, "wb") as f:
        pickle.dump(list(sys.path), f)  # read first, so modules found only through the driver's path import
        cloudpickle.dump((launcher.task_function, launcher.hydra_context, job.config, state), f)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # One line per job on the sweep's terminal: the job's own output goes to its folder, unless verbose=true or
    # it is a dry run's, whose output (the DeepSpeed config) is the point.
    output = None if job.config.get("verbose") or job.config.get("dry_run") else Path(job.output_dir) / OUTPUT_LOG
    returncode = children.run([*python, "-m", JOB_MODULE, str(payload), str(result)], env, output)
    if returncode is None:
        raise SweepStopped(f"job #{job.idx} not started: the sweep is stopping")
    if result.exists():
        with open(result, "rb") as f:
            return pickle.load(f)
    return dead_job_return(job, returncode)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Run the batch, one job per process, each on as many of the sweep's GPUs as its ``devices`` (one at a
    time without GPUs); return JobReturns in job order."""
    from zi_app.plan.hardware import visible_gpus

    python = job_interpreter(launcher.python)
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus() if launcher.gpus is None else launcher.gpus
    pool = GpuPool(gpus)
    jobs = [compose(launcher, overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
    # Hydra's launch lines: details, shown with verbose=true.
    detail = logging.INFO if config.get("verbose") else logging.DEBUG
    log.log(detail, "Launching %d jobs, each in a new process, %s", len(jobs),
             f"each on its devices' count of GPUs {','.join(gpus)}" if gpus else "one at a time")
    refused, plans = plan_jobs(jobs, len(gpus))
    seconds = {idx: plan.predicted_job_s for idx, plan in plans.items()}
    plan = TimePlan(seconds, max(1, len(gpus)), launcher.batch_name)
    if seconds:
        print(plan.start_line(), flush=True)
    state = Singleton.get_state()
    progress = Progress(initial_job_idx, initial_job_idx + len(jobs), launcher.result_label, plan)
    callback_lock = threading.Lock()
    children = Children()

    def run_one(job: Job) -> JobReturn:
        if job.idx in refused:
            LAUNCHED.append(list(job.overrides))
            ret = refused_job_return(job, refused[job.idx])
            with callback_lock:  # recorded as its process would have: a FAILED run, kind invalid-config
                launcher.hydra_context.callbacks.on_job_end(config=job.config, job_return=ret)
            progress.job_ended(job, ret, 0.0, None)
            return ret
        # Only a dry run (never refused) can ask for more GPUs than the sweep has: it would wait forever.
        taken = pool.take(min(job_devices(job), len(gpus)))
        gpu = ",".join(taken) or None
        try:
            log.log(detail, "\t#%d : %s", job.idx, label(job.overrides))
            start = time.monotonic()
            ret = run_in_process(launcher, job, gpu, state, Path(workdir), children, python)
            LAUNCHED.append(list(job.overrides))  # it ran (one the stopping sweep never started raised above)
            if isinstance(ret._return_value, JobProcessError):
                with callback_lock:  # the job's own on_job_end never ran: tell the callbacks here
                    launcher.hydra_context.callbacks.on_job_end(config=job.config, job_return=ret)
            progress.job_ended(job, ret, time.monotonic() - start, gpu)
            return ret
        finally:
            pool.give_back(taken)

    # Inside the sweep's folder: a driver killed with SIGKILL leaves it there, not in the system's temp folder.
    with tempfile.TemporaryDirectory(prefix=".zi-launcher-", dir=sweep_dir) as workdir:
        threads = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(gpus)))
        try:
            returns = list(threads.map(run_one, jobs))
        except BaseException as error:
            # The signal that stopped the driver (Ctrl-C: SIGINT), or SIGTERM when the sweep fails otherwise.
            default = signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
            children.stop(getattr(error, "signum", default))
            raise
        finally:
            threads.shutdown(cancel_futures=True)  # waits for the running jobs, which the signal ends
    return [reported(job, ret) for job, ret in zip(jobs, returns)]


def reported(job: Job, ret: JobReturn) -> JobReturn:
    """``ret`` as the sweeper gets it: a failed job's error becomes its one line (:class:`JobFailed`), raised
    without Hydra's "Error executing job" line (:class:`QuietJobReturn`)."""
    if ret.status != JobStatus.FAILED:
        return ret
    quiet = QuietJobReturn(**{f.name: getattr(ret, f.name) for f in dataclasses.fields(JobReturn)})
    quiet.return_value = JobFailed(failure_line(job.idx, job.overrides, job.output_dir, ret), ret._return_value)
    return quiet
