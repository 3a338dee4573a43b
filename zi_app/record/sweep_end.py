"""The end of a sweep, recorded: failed jobs whose own process could not record them get a FAILED run, and the
parent run gets the job table, plot, best run and counts, then the summary is printed. Called by the sweep's
Hydra callback (hydra_plugins/zero_inference/sweep_callback.py) under any launcher.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf

from zi_app.config.paths import command
from zi_app.record import orphans, results, runs, store
from zi_app.record.redaction import redact_overrides
from zi_app.run import interrupt

SWEEP_DIR_TAG = "zi.sweep_dir"
BEST_RUN_TAG = "zi.best_run_id"
BEST_OVERRIDES_TAG = "zi.best_overrides"
JOBS_TAG = "zi.jobs"
FAILED_JOBS_TAG = "zi.failed_jobs"
NEVER_RAN_TAG = "zi.never_ran"  # how many planned jobs never started (the sweep was stopped first)
UNRECORDED_TAG = "zi.unrecorded_jobs"  # how many jobs ran but left no run (the store refused their writes)
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
    launched: Optional[List[str]] = None  # the overrides of every job started, when the launcher says (ours)


class _DiedStarting(RuntimeError):
    """A job whose process ended before it opened its MLflow run."""

    failure_kind = "killed"


def settle_job(output_dir: Path, job_config: dict, overrides: Sequence[str], error: BaseException,
               launch_dir: Optional[str] = None) -> None:
    """Record a failed job whose own process could not: mark its RUNNING run FAILED, or, when it died
    before opening one, create a FAILED run for it (and its run-id file, so it is recorded once).

    ``launch_dir`` is where the sweep was started: a relative store path starts there, as the app's does.
    """
    kind, message = runs.failure_kind(error), f"{type(error).__name__}: {error}"
    overrides = redact_overrides(overrides)
    # Also points MLflow at the job's store, which record_failure and failed_run write to.
    uri = store.absolute_uri(job_config["tracking"]["uri"], launch_dir)
    experiment_id = store.open_experiment(uri, job_config["tracking"]["experiment"],
                                          job_config["tracking"]["connect_timeout_s"])
    run_file = output_dir / runs.RUN_ID_FILE
    recorded = _recorded_run(run_file)
    if recorded is not None:
        if recorded.info.status == "RUNNING":
            runs.record_failure(recorded.info.run_id, kind, message, runs.failure_tags(error))
        return
    tags = {runs.OVERRIDES_TAG: overrides, **runs.sweep_parent_tags()}
    run_id = runs.failed_run(experiment_id, runs.run_name(overrides), runs.job_params(job_config),
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
    parent = os.environ.get(runs.PARENT_RUN_ENV)
    return run if parent is None or run.data.tags.get("mlflow.parentRunId") == parent else None


def close_sweep(sweep: Sweep, stopped_by: Optional[int]) -> None:
    """The end of a sweep (see :meth:`SweepCallback.finish`); ``stopped_by`` is the signal that stopped it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.uri)
    parent = sweep.parent_run_id
    signal_name = None if stopped_by is None else interrupt.signal_name(stopped_by)
    signal_tags = {runs.SIGNAL_TAG: signal_name} if signal_name else {}
    settle_unrecorded_jobs(sweep)
    _, still_running = orphans.reap_dead_runs(client, [sweep.experiment_id], "its process ended while the sweep ran",
                                               parent_run_id=parent)
    rows = results.child_rows(client, parent)
    ran = {row.overrides for row in rows}
    # Jobs that ran and left no run (their store refused the writes: a full disk) are neither fine nor "never ran".
    lost = [] if sweep.launched is None else [job for job in sweep.launched if job not in ran]
    never_ran = None if sweep.planned is None else [job for job in sweep.planned if job not in ran and job not in lost]
    if lost:
        client.set_tag(parent, UNRECORDED_TAG, str(len(lost)))
    if never_ran:
        client.set_tag(parent, NEVER_RAN_TAG, str(len(never_ran)))
        client.log_text(parent, "".join(f"{job}\n" for job in never_ran), NEVER_RAN_ARTIFACT)
    if not rows:
        if signal_name:
            runs.record_failure(parent, "killed", headline(rows, [], never_ran, signal_name), signal_tags,
                                    client=client)
            print(f"\nSweep interrupted by {signal_name} before any job ran; its parent run {parent} is marked "
                  f"FAILED.", flush=True)
        else:
            what = (f"none of the sweep's {len(lost)} jobs could be recorded" if lost else
                    "the sweep ended before any job ran")
            runs.record_failure(parent, "error", f"{what} (see its error output)", client=client)
            said = f"None of its {len(lost)} jobs could be recorded" if lost else "Sweep ended before any job ran"
            print(f"\n{said}; its parent run {parent} is marked FAILED.", flush=True)
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
    said = headline(rows, failed, never_ran, signal_name, len(lost))
    if signal_name:
        runs.record_failure(parent, "killed", said, signal_tags, client=client)
    elif lost:  # not FINISHED: part of what it measured is not in the store (each job's folder has it)
        runs.record_failure(parent, "error", said, client=client)
    else:
        client.set_terminated(parent, "FINISHED" if top is not None else "FAILED")
    print(summary(sweep, rows, top, failed, never_ran, signal_name, len(lost)), flush=True)


def settle_unrecorded_jobs(sweep: Sweep) -> None:
    """Give a FAILED run to each job of this sweep that left its Hydra files but never opened an MLflow
    run (its process died while starting, under a launcher that does not report dead jobs)."""
    if sweep.output_subdir is None:
        return
    for overrides_file in sweep.sweep_dir.rglob(f"{sweep.output_subdir}/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        config_file = overrides_file.parent / "config.yaml"
        if (job_dir / runs.RUN_ID_FILE).exists() or overrides_file.stat().st_mtime < sweep.started \
                or not config_file.exists():
            continue
        job_config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
        if job_config.get("dry_run"):
            continue
        overrides = list(OmegaConf.load(overrides_file))
        try:
            settle_job(job_dir, job_config, overrides, _DiedStarting(f"the job's process ended before it opened "
                                                                     f"its MLflow run (killed, or crashed while "
                                                                     f"starting); see {job_dir}"))
        except Exception:  # noqa: BLE001 - the store refuses writes (a full disk): counted as not recorded
            continue


def best_command(sweep: Sweep) -> str:
    """The best-run command for this sweep, pasteable into any shell in any directory."""
    return f"{command('zi-best', 'zi_app.zi_best')} --tracking-uri {sweep.uri} --parent {sweep.parent_run_id}"


def headline(rows: List[results.JobRow], failed: List[results.JobRow], never_ran: Optional[List[str]],
             signal_name: Optional[str], lost: int = 0) -> str:
    """``Sweep finished: 4 jobs, 1 failed (oom: 1)`` or ``Sweep interrupted by SIGINT: 2 of 5 jobs ran, 3
    never ran``, with the failures by kind, and the jobs that ran but could not be recorded (``lost``)."""
    kinds = Counter(row.failure_kind or row.status for row in failed)
    counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    failures = f"{len(failed)} failed" + (f" ({counts})" if counts else "")
    failures += f", {lost} ran but could not be recorded (see their folders)" if lost else ""
    ran = len(rows) + lost
    if signal_name is None:
        return f"Sweep finished: {ran} jobs, {failures}" + (f", {len(never_ran)} never ran" if never_ran else "")
    if never_ran is None:
        return f"Sweep interrupted by {signal_name}: {ran} jobs ran, {failures}"
    return (f"Sweep interrupted by {signal_name}: {ran} of {ran + len(never_ran)} jobs ran, "
            f"{len(never_ran)} never ran; {failures}")


def summary(sweep: Sweep, rows: List[results.JobRow], top: Optional[results.JobRow],
            failed: List[results.JobRow], never_ran: Optional[List[str]] = None,
            signal_name: Optional[str] = None, lost: int = 0) -> str:
    """The end-of-sweep report: job table, failure count, jobs that never ran, best run, and where to browse
    the runs."""
    common = results.common_overrides(rows)
    lines = ["", headline(rows, failed, never_ran, signal_name, lost)]
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


def record_refused(uri: str, experiment: str, overrides: Sequence[str], refusal: str) -> None:
    """A FAILED parent run (kind ``invalid-config``, the refusal as its message) for a sweep refused before any
    job, so that the store shows it was tried; nothing where the store cannot be used: the refusal is what to
    say, not this record's failure."""
    with contextlib.suppress(Exception):  # noqa: BLE001 - see above
        experiment_id = store.open_experiment(store.absolute_uri(uri), experiment)
        shown = redact_overrides(overrides)
        parent = runs.start_sweep_run(experiment_id, f"sweep {shown}"[:200], {runs.OVERRIDES_TAG: shown})
        runs.record_failure(parent, "invalid-config", f"the sweep was refused before any job: {refusal}")
