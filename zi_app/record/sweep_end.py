"""The end of a sweep, recorded: failed jobs whose own process could not record them get a FAILED run, and the
parent run gets the job table, plot, best run and counts, then the summary is printed. Called by the sweep's
Hydra callback (hydra_plugins/zero_inference/sweep_callback.py) under any launcher.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Set


from zi_app.config.paths import command
from zi_app.record import orphans, results, runs, store
from zi_app.record.redaction import redact_overrides, redact_text
from zi_app.record.settle import settle_unrecorded_jobs
from zi_app.run import interrupt

SWEEP_DIR_TAG = "zi.sweep_dir"
BEST_RUN_TAG = "zi.best_run_id"
BEST_OVERRIDES_TAG = "zi.best_overrides"
JOBS_TAG = "zi.jobs"
FAILED_JOBS_TAG = "zi.failed_jobs"
NEVER_RAN_TAG = "zi.never_ran"  # how many planned jobs never started (the sweep was stopped first)
ARTIFACTS = {"csv": "jobs.csv", "markdown": "jobs.md", "plot": "throughput.png"}
NEVER_RAN_ARTIFACT = "never_ran.txt"  # the overrides of each job that never started, one per line
# Jobs that ran but could not be recorded while they did (the tracking server did not answer): how many, and
# their overrides, one per line, each marked "recorded late" (FAILED, at the sweep's end) or "never recorded".
UNRECORDED_TAG = "zi.unrecorded_jobs"
UNRECORDED_ARTIFACT = "unrecorded.txt"


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


def close_sweep(sweep: Sweep, stopped_by: Optional[int]) -> None:
    """The end of a sweep (see :meth:`SweepCallback.finish`); ``stopped_by`` is the signal that stopped it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.uri)
    parent = sweep.parent_run_id
    signal_name = None if stopped_by is None else interrupt.signal_name(stopped_by)
    signal_tags = {runs.SIGNAL_TAG: signal_name} if signal_name else {}
    late, lost = settle_unrecorded_jobs(sweep)
    _, still_running = orphans.reap_dead_runs(client, [sweep.experiment_id], "its process ended while the sweep ran",
                                               parent_run_id=parent)
    rows = results.child_rows(client, parent)
    ran = {row.overrides for row in rows}
    # A job our launcher ran that left no run and no Hydra files to settle it from (a full disk): never recorded.
    lost += [job for job in sweep.launched or [] if job not in ran and job not in late and job not in lost]
    never_ran = None if sweep.planned is None else [job for job in sweep.planned if job not in ran | set(lost)]
    if late or lost:
        client.set_tag(parent, UNRECORDED_TAG, str(len(late) + len(lost)))
        client.log_text(parent, "".join([f"recorded late: {job}\n" for job in late] +
                                        [f"never recorded: {job}\n" for job in lost]), UNRECORDED_ARTIFACT)
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
    top, failed = write_results(client, parent, rows, still_running)
    if signal_name:
        runs.record_failure(parent, "killed", headline(rows, failed, never_ran, signal_name), signal_tags,
                                client=client)
    else:
        # A job never recorded is a result lost: the sweep did not finish well, whatever the others did.
        client.set_terminated(parent, "FINISHED" if top is not None and not lost else "FAILED")
    print(summary(sweep, rows, top, failed, never_ran, signal_name, late, lost), flush=True)


def write_results(client, parent: str, rows: List[results.JobRow], still_running: Set[str] = frozenset()) -> tuple:
    """The parent run's job tables, plot, counts and best run, from its jobs' ``rows``; returns (the best row or
    None, the failed rows; a job in ``still_running`` is not counted failed)."""
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
    return top, failed


def settle_dead_sweeps(client, experiment_ids: List[str]) -> List[str]:
    """Write the table, plot and best run of each sweep whose driver died (its parent closed ``killed`` with
    ``zi.settle=pending``, :mod:`orphans`) once none of its jobs is RUNNING any more: jobs of a SLURM sweep
    go on after their driver is gone. The parent stays FAILED (its driver was killed), its message says what
    was settled. Returns the settled parents' ids."""
    settled = []
    if not experiment_ids:
        return settled
    for parent in store.search_runs(client, experiment_ids, f"tags.`{orphans.SETTLE_TAG}` = 'pending'"):
        run_id = parent.info.run_id
        rows = results.child_rows(client, run_id)
        if any(row.status == "RUNNING" for row in rows):
            continue  # a later command settles it, once they have ended
        top, failed = write_results(client, run_id, rows) if rows else (None, [])
        best = f"best {top.overrides or '(no overrides)'}" if top is not None else "no job completed"
        message = (f"{parent.data.tags.get(runs.FAILURE_MESSAGE_TAG, 'its driver was killed')}; settled once its "
                   f"jobs had ended: {len(rows)} job(s), {len(failed)} failed, {best}")
        client.set_tag(run_id, runs.FAILURE_MESSAGE_TAG, redact_text(message)[:4000])
        client.set_tag(run_id, orphans.SETTLE_TAG, "done")
        settled.append(run_id)
    return settled


def close_dead(client, experiment_ids: List[str], when: str) -> None:
    """What a command starting on the store does first: close the runs whose process is gone
    (:func:`orphans.close_dead_runs`), then settle the sweeps whose driver died and whose jobs have ended."""
    orphans.close_dead_runs(client, experiment_ids, when)
    settled = settle_dead_sweeps(client, experiment_ids)
    if settled:
        print(f"MLflow: wrote the table and best run of {len(settled)} sweep(s) whose jobs ended after their "
              f"driver died: {', '.join(settled)}", file=sys.stderr, flush=True)


def best_command(sweep: Sweep) -> str:
    """The best-run command for this sweep, pasteable into any shell in any directory."""
    return f"{command('zi-best', 'zi_app.zi_best')} --tracking-uri {sweep.uri} --parent {sweep.parent_run_id}"


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
            signal_name: Optional[str] = None, late: Sequence[str] = (), lost: Sequence[str] = ()) -> str:
    """The end-of-sweep report: job table, failure count, jobs that never ran, jobs not recorded while they ran
    (``late``: recorded FAILED at the end; ``lost``: never recorded), best run, and where to browse the runs."""
    common = results.common_overrides(rows)
    lines = ["", headline(rows, failed, never_ran, signal_name) + (f", {len(lost)} never recorded" if lost else "")]
    if late or lost:
        def own(job: str) -> str:  # what sets the job apart: the overrides every job shares are said below
            return " ".join(item for item in job.split() if item not in common.split()) or job

        lines.append("Not recorded while they ran (the store did not take them: a tracking server away, a full "
                     "disk): "
                     + "; ".join([f"{own(job)} (recorded FAILED at the sweep's end)" for job in late]
                                 + [f"{own(job)} (never recorded)" for job in lost]))
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
