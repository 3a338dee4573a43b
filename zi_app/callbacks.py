"""The sweep's bookkeeping as a Hydra callback, so that it works under any launcher (process_per_job,
basic, submitit, joblib, ...): a parent run per multirun, failed jobs recorded as FAILED runs, no run
left RUNNING after its process died, and at the end the sweep's table, plot, best run and summary.

Declared in conf/config.yaml under ``hydra.callbacks``. Hydra skips ``on_multirun_end`` when a job
failed or the sweep was stopped by a signal, so the end of the sweep is also handled by an ``atexit`` hook
registered at its start. Hydra turns a callback's exception into a warning: these hooks stop the sweep
instead (exit 2 for a store that cannot be used, else 1).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from zi_app import interrupt, tracking
from zi_app import sweep as results
from zi_app.paths import command
from zi_app.redaction import redact_overrides, redact_text

SWEEP_DIR_TAG = "zi.sweep_dir"
BEST_RUN_TAG = "zi.best_run_id"
BEST_OVERRIDES_TAG = "zi.best_overrides"
JOBS_TAG = "zi.jobs"
FAILED_JOBS_TAG = "zi.failed_jobs"
NEVER_RAN_TAG = "zi.never_ran"  # how many planned jobs never started (the sweep was stopped first)
ARTIFACTS = {"csv": "jobs.csv", "markdown": "jobs.md", "plot": "throughput.png"}
NEVER_RAN_ARTIFACT = "never_ran.txt"  # the overrides of each job that never started, one per line


@dataclass
class Sweep:
    """What the driver knows about the running sweep (picklable: launchers ship callbacks to jobs)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: Path
    output_subdir: Optional[str]
    started: float
    planned: Optional[List[str]] = None  # every job's overrides, when the sweeper says up front


def planned_jobs(config: DictConfig) -> Optional[List[str]]:
    """The overrides of every job the sweep will launch, spelled (and redacted) as each job's ``zi.overrides``
    tag; None under a sweeper other than Hydra's basic one (an optimizer decides its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return [redact_overrides(" ".join(job)) for batch in BasicSweeper.split_arguments(overrides, None)
                for job in batch]
    except Exception:  # noqa: BLE001 - Hydra reports a bad override itself; we only lose the count
        return None


def _stops_the_sweep(hook: Callable) -> Callable:
    """A hook whose failure stops the sweep with one line (a store problem: exit 2) or a traceback (exit 1),
    where Hydra would print a warning and go on."""
    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except tracking.StoreError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(tracking.EXIT_STORE_ERROR) from None
        except Exception:  # noqa: BLE001 - any failure of the sweep's bookkeeping
            traceback.print_exc()
            print(f"error: the sweep's {hook.__name__} hook failed (above); the sweep stops", file=sys.stderr,
                  flush=True)
            raise SystemExit(1) from None
    return run


def _task_config(config: DictConfig) -> dict:
    """The job's own keys (Hydra's node left out), resolved."""
    return OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True)


class _DiedStarting(RuntimeError):
    """A job whose process ended before it opened its MLflow run."""

    failure_kind = "killed"


def settle_job(output_dir: Path, job_config: dict, overrides: str, error: BaseException,
               launch_dir: Optional[str] = None) -> None:
    """Record a failed job whose own process could not: mark its RUNNING run FAILED, or, when it died
    before opening one, create a FAILED run for it (and its run-id file, so it is recorded once).

    ``launch_dir`` is where the sweep was started: a relative store path starts there, as the app's does.
    """
    kind, message = tracking.failure_kind(error), f"{type(error).__name__}: {error}"
    overrides = redact_overrides(overrides)
    # Also points MLflow at the job's store, which record_failure and failed_run write to.
    uri = tracking.absolute_uri(job_config["tracking"]["uri"], launch_dir)
    experiment_id = tracking.open_experiment(uri, job_config["tracking"]["experiment"])
    run_file = output_dir / tracking.RUN_ID_FILE
    recorded = _recorded_run(run_file)
    if recorded is not None:
        if recorded.info.status == "RUNNING":
            tracking.record_failure(recorded.info.run_id, kind, message, tracking.failure_tags(error))
        return
    tags = {tracking.OVERRIDES_TAG: overrides, **tracking.sweep_parent_tags()}
    run_id = tracking.failed_run(experiment_id, tracking.run_name(overrides), tracking.job_params(job_config),
                                 tags, kind, message)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(run_id)


def _recorded_run(run_file: Path):
    """The run whose id the job wrote to ``run_file``, if that run is this sweep's (nested under the parent
    in ``ZI_PARENT_RUN_ID``): a file another sweep wrote in a shared folder names a run not ours to settle."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not run_file.exists():
        return None
    try:
        run = MlflowClient().get_run(run_file.read_text().strip())
    except MlflowException:
        return None
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    return run if parent is None or run.data.tags.get("mlflow.parentRunId") == parent else None


class SweepCallback(Callback):
    """Parent run, failure records and the end-of-sweep summary of a multirun of the zero-inference app."""

    def __init__(self) -> None:
        self.sweep: Optional[Sweep] = None

    @_stops_the_sweep
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the store, create it, the experiment and the parent run before any job starts (parallel jobs
        creating a fresh SQLite store race on its schema), close runs whose process is gone, pass the
        parent's id to the jobs, and let SIGTERM/SIGHUP stop the sweep as Ctrl-C does."""
        if config.dry_run:
            return
        from mlflow.tracking import MlflowClient  # here, not at import: every run of the app loads this module

        interrupt.install()
        uri = tracking.absolute_uri(config.tracking.uri)
        experiment_id = tracking.open_experiment(uri, config.tracking.experiment)
        tracking.close_dead_runs(MlflowClient(uri), [experiment_id], "when a sweep started")
        overrides = redact_overrides(" ".join(config.hydra.overrides.task))
        os.environ[tracking.SWEPT_KEYS_ENV] = ",".join(swept_keys(config.hydra.overrides.task))
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        parent = tracking.start_sweep_run(experiment_id, f"sweep {overrides}"[:200],
                                          {tracking.OVERRIDES_TAG: overrides, SWEEP_DIR_TAG: str(sweep_dir)})
        os.environ[tracking.PARENT_RUN_ENV] = parent  # inherited by job processes; not MLFLOW_RUN_ID (resumes)
        MlflowClient().set_experiment_tag(experiment_id, results.VIEW_STATE_TAG + parent,
                                          json.dumps(results.view_state(parent)))
        self.sweep = Sweep(uri, experiment_id, parent, sweep_dir, config.hydra.output_subdir, time.time(),
                           planned_jobs(config))
        atexit.register(self.finish)
        print(f"MLflow: sweep parent run {parent} in experiment '{config.tracking.experiment}' ({redact_text(uri)})",
              flush=True)

    @_stops_the_sweep
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A failed job whose run is still open (its process died) or was never opened gets a FAILED run.

        Runs in the job's process, or in the driver when a launcher reports a job whose process died.
        """
        if job_return.status != JobStatus.FAILED or config.dry_run:
            return
        settle_job(Path(config.hydra.runtime.output_dir), _task_config(config), " ".join(config.hydra.overrides.task),
                   job_return._return_value,  # the public property raises for a failed job
                   launch_dir=config.hydra.runtime.cwd)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.finish():
            raise SystemExit(1)

    def finish(self) -> bool:
        """Close the sweep once: settle dead jobs, write the table, plot and best-run tags on the parent
        run, close it (FAILED, kind ``killed``, when a signal stopped the sweep), and print the summary.

        Returns False when that failed: said in one line, and the parent run closed FAILED if the store
        still takes writes (else the next command on the store closes it, its process being gone).
        """
        sweep, self.sweep = self.sweep, None
        if sweep is None:
            return True
        atexit.unregister(self.finish)
        try:
            close_sweep(sweep, interrupt.received())
            return True
        except Exception as error:  # noqa: BLE001 - a full disk, a store gone away: close what we can
            parent = sweep.parent_run_id
            print(f"error: the end of the sweep failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(sweep.uri)
                if client.get_run(parent).info.status == "RUNNING":
                    tracking.record_failure(parent, "error", f"the end of the sweep failed: {type(error).__name__}: "
                                            f"{error}", client=client)
                print(f"Its parent run {parent} is marked FAILED.", file=sys.stderr, flush=True)
            except Exception as second:  # noqa: BLE001
                print(f"Its parent run {parent} could not be closed either ({type(second).__name__}); the next "
                      f"command on this store closes it.", file=sys.stderr, flush=True)
            return False


def close_sweep(sweep: Sweep, stopped_by: Optional[int]) -> None:
    """The end of a sweep (see :meth:`SweepCallback.finish`); ``stopped_by`` is the signal that stopped it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.uri)
    parent = sweep.parent_run_id
    signal_name = None if stopped_by is None else interrupt.signal_name(stopped_by)
    signal_tags = {tracking.SIGNAL_TAG: signal_name} if signal_name else {}
    settle_unrecorded_jobs(sweep)
    _, still_running = tracking.reap_dead_runs(client, [sweep.experiment_id], "its process ended while the sweep ran",
                                               parent_run_id=parent)
    rows = results.child_rows(client, parent)
    ran = {row.overrides for row in rows}
    never_ran = None if sweep.planned is None else [job for job in sweep.planned if job not in ran]
    if never_ran:
        client.set_tag(parent, NEVER_RAN_TAG, str(len(never_ran)))
        client.log_text(parent, "".join(f"{job}\n" for job in never_ran), NEVER_RAN_ARTIFACT)
    if not rows:
        if signal_name:
            tracking.record_failure(parent, "killed", headline(rows, [], never_ran, signal_name), signal_tags,
                                    client=client)
            print(f"\nSweep interrupted by {signal_name} before any job ran; its parent run {parent} is marked "
                  f"FAILED.", flush=True)
        else:
            tracking.record_failure(parent, "error", "the sweep ended before any job ran (see its error output)",
                                    client=client)
            print(f"\nSweep ended before any job ran; its parent run {parent} is marked FAILED.", flush=True)
        return
    top = results.best(rows)
    client.log_text(parent, results.csv_table(rows, top), ARTIFACTS["csv"])
    client.log_text(parent, results.markdown_table(rows, top), ARTIFACTS["markdown"])
    client.log_figure(parent, results.plot(rows), ARTIFACTS["plot"])
    failed = [row for row in rows if not row.completed and row.run_id not in still_running]
    client.set_tag(parent, JOBS_TAG, str(len(rows)))
    client.set_tag(parent, FAILED_JOBS_TAG, str(len(failed)))
    if top is not None:
        client.set_tag(parent, BEST_RUN_TAG, top.run_id)
        client.set_tag(parent, BEST_OVERRIDES_TAG, top.overrides)
        client.log_metric(parent, f"best_{results.METRIC}", top.metrics[results.METRIC])
    if signal_name:
        tracking.record_failure(parent, "killed", headline(rows, failed, never_ran, signal_name), signal_tags,
                                client=client)
    else:
        client.set_terminated(parent, "FINISHED" if top is not None else "FAILED")
    print(summary(sweep, rows, top, failed, never_ran, signal_name), flush=True)


def swept_keys(overrides: List[str]) -> List[str]:
    """The keys a multirun's command-line overrides sweep over (``batch=1,8`` or ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.key_or_group for override in parsed if override.is_sweep_override()]



def settle_unrecorded_jobs(sweep: Sweep) -> None:
    """Give a FAILED run to each job of this sweep that left its Hydra files but never opened an MLflow
    run (its process died while starting, under a launcher that does not report dead jobs)."""
    if sweep.output_subdir is None:
        return
    for overrides_file in sweep.sweep_dir.rglob(f"{sweep.output_subdir}/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        config_file = overrides_file.parent / "config.yaml"
        if (job_dir / tracking.RUN_ID_FILE).exists() or overrides_file.stat().st_mtime < sweep.started \
                or not config_file.exists():
            continue
        job_config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
        if job_config.get("dry_run"):
            continue
        overrides = " ".join(OmegaConf.load(overrides_file))
        settle_job(job_dir, job_config, overrides, _DiedStarting(f"the job's process ended before it opened its "
                                                                 f"MLflow run (killed, or crashed while starting); "
                                                                 f"see {job_dir}"))


def best_command(sweep: Sweep) -> str:
    """The best-run command for this sweep, pasteable into any shell in any directory."""
    return f"{command('zi-best', 'zi_app.best')} --tracking-uri {sweep.uri} --parent {sweep.parent_run_id}"


def headline(rows: List[results.JobRow], failed: List[results.JobRow], never_ran: Optional[List[str]],
             signal_name: Optional[str]) -> str:
    """``Sweep finished: 4 jobs, 1 failed (oom: 1)`` or ``Sweep interrupted by SIGINT: 2 of 5 jobs ran, 3
    never ran``, with the failures by kind."""
    kinds = Counter(row.failure_kind or row.status for row in failed)
    counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    failures = f"{len(failed)} failed" + (f" ({counts})" if counts else "")
    if signal_name is None:
        return f"Sweep finished: {len(rows)} jobs, {failures}" + (f", {len(never_ran)} never ran" if never_ran else "")
    if never_ran is None:
        return f"Sweep interrupted by {signal_name}: {len(rows)} jobs ran, {failures}"
    return (f"Sweep interrupted by {signal_name}: {len(rows)} of {len(rows) + len(never_ran)} jobs ran, "
            f"{len(never_ran)} never ran; {failures}")


def summary(sweep: Sweep, rows: List[results.JobRow], top: Optional[results.JobRow],
            failed: List[results.JobRow], never_ran: Optional[List[str]] = None,
            signal_name: Optional[str] = None) -> str:
    """The end-of-sweep report: job table, failure count, jobs that never ran, best run, and where to browse
    the runs."""
    common = results.common_overrides(rows)
    lines = ["", headline(rows, failed, never_ran, signal_name)]
    lines += [f"Every job: {common}"] if common else []
    lines += [results.console_table(rows, top), ""]
    if top is not None:
        lines.append(f"Best: {top.overrides or '(no overrides)'}: {top.metrics[results.METRIC]:.2f} tokens/s "
                     f"(run {top.run_id}; details: {best_command(sweep)})")
    else:
        lines.append("Best: none, no job completed")
    command = results.ui_command(sweep.uri)
    if command:
        lines.append(f"Browse the runs: {command}")
    lines.append(f"This sweep's runs, best first: "
                 f"{results.view_url(sweep.uri, sweep.experiment_id, sweep.parent_run_id)}")
    lines.append(f"Its parent run (table, plot): "
                 f"{results.run_url(sweep.uri, sweep.experiment_id, sweep.parent_run_id)}")
    if failed:
        lines.append(f"{len(failed)} of {len(rows)} jobs failed.")
    return "\n".join(lines)
