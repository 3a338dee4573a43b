"""The sweep's bookkeeping as a Hydra callback, so that it works under any launcher (process_per_job,
basic, submitit, joblib, ...): a parent run per multirun, failed jobs recorded as FAILED runs, no run
left RUNNING after its process died, and at the end the sweep's table, plot, best run and summary.

Declared in conf/config.yaml under ``hydra.callbacks``. Hydra skips ``on_multirun_end`` when a job
failed, so the end of the sweep is also handled by an ``atexit`` hook registered at its start.
"""

from __future__ import annotations

import atexit
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from zi_app import sweep as results
from zi_app import tracking
from zi_app.redaction import redact_overrides, redact_text

SWEEP_DIR_TAG = "zi.sweep_dir"
BEST_RUN_TAG = "zi.best_run_id"
BEST_OVERRIDES_TAG = "zi.best_overrides"
JOBS_TAG = "zi.jobs"
FAILED_JOBS_TAG = "zi.failed_jobs"
ARTIFACTS = {"csv": "jobs.csv", "markdown": "jobs.md", "plot": "throughput.png"}


@dataclass
class Sweep:
    """What the driver knows about the running sweep (picklable: launchers ship callbacks to jobs)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: Path
    output_subdir: Optional[str]
    started: float


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
    if run_file.exists():
        run_id = run_file.read_text().strip()
        if MlflowClient().get_run(run_id).info.status == "RUNNING":
            tracking.record_failure(run_id, kind, message)
        return
    tags = {tracking.OVERRIDES_TAG: overrides, **tracking.sweep_parent_tags()}
    run_id = tracking.failed_run(experiment_id, tracking.run_name(overrides), tracking.job_params(job_config),
                                 tags, kind, message)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(run_id)


class SweepCallback(Callback):
    """Parent run, failure records and the end-of-sweep summary of a multirun of the zero-inference app."""

    def __init__(self) -> None:
        self.sweep: Optional[Sweep] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the store, the experiment and the parent run before any job starts (parallel jobs
        creating a fresh SQLite store race on its schema), and pass the parent's id to the jobs."""
        if config.dry_run:
            return
        uri = tracking.absolute_uri(config.tracking.uri)
        experiment_id = tracking.open_experiment(uri, config.tracking.experiment)
        reap_dead_runs(MlflowClient(uri), [experiment_id], "found RUNNING with its process gone when a sweep started")
        overrides = redact_overrides(" ".join(config.hydra.overrides.task))
        os.environ[tracking.SWEPT_KEYS_ENV] = ",".join(swept_keys(config.hydra.overrides.task))
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        parent = tracking.start_sweep_run(experiment_id, f"sweep {overrides}"[:200],
                                          {tracking.OVERRIDES_TAG: overrides, SWEEP_DIR_TAG: str(sweep_dir)})
        os.environ[tracking.PARENT_RUN_ENV] = parent  # inherited by job processes; not MLFLOW_RUN_ID (resumes)
        self.sweep = Sweep(uri, experiment_id, parent, sweep_dir, config.hydra.output_subdir, time.time())
        atexit.register(self.finish)
        print(f"MLflow: sweep parent run {parent} in experiment '{config.tracking.experiment}' ({redact_text(uri)})",
              flush=True)

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
        self.finish()

    def finish(self) -> None:
        """Close the sweep once: settle dead jobs, write the table, plot and best-run tags on the parent
        run, close it, and print the summary."""
        sweep, self.sweep = self.sweep, None
        if sweep is None:
            return
        atexit.unregister(self.finish)
        client = MlflowClient(sweep.uri)
        settle_unrecorded_jobs(sweep)
        still_running = reap_dead_runs(client, [sweep.experiment_id], "its process ended while the sweep ran",
                                       parent_run_id=sweep.parent_run_id)
        rows = results.child_rows(client, sweep.parent_run_id)
        parent = sweep.parent_run_id
        if not rows:
            tracking.record_failure(parent, "error", "the sweep ended before any job ran (see its error output)")
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
        client.set_terminated(parent, "FINISHED" if top is not None else "FAILED")
        print(summary(sweep, rows, top, failed), flush=True)


def swept_keys(overrides: List[str]) -> List[str]:
    """The keys a multirun's command-line overrides sweep over (``batch=1,8`` or ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.key_or_group for override in parsed if override.is_sweep_override()]


def reap_dead_runs(client, experiment_ids: List[str], message: str, parent_run_id: Optional[str] = None) -> set:
    """Mark FAILED (kind ``killed``) the RUNNING runs whose process is gone; return the ids still running.

    Without ``parent_run_id``: runs whose process is known to be gone (this host, pid not alive). With
    it: also that sweep's jobs whose process cannot be checked (another host), since the sweep is over.
    """
    running = set()
    for run in results.search_runs(client, experiment_ids, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if run.info.run_id == parent_run_id:
            continue
        alive = tracking.process_alive(tags)
        ours = parent_run_id is not None and tags.get("mlflow.parentRunId") == parent_run_id
        if alive is False or (ours and alive is None):
            tracking.record_failure(run.info.run_id, "killed", f"{message} (process {tags.get(tracking.PID_TAG)} on "
                                    f"{tags.get(tracking.HOST_TAG)}): killed, e.g. by the kernel's out-of-memory "
                                    f"killer, or crashed hard")
        elif ours:
            running.add(run.info.run_id)
    return running


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


def summary(sweep: Sweep, rows: List[results.JobRow], top: Optional[results.JobRow],
            failed: List[results.JobRow]) -> str:
    """The end-of-sweep report: job table, failure count, best run, and where to browse the runs."""
    kinds = Counter(row.failure_kind or row.status for row in failed)
    counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    common = results.common_overrides(rows)
    lines = ["", f"Sweep finished: {len(rows)} jobs, {len(failed)} failed" + (f" ({counts})" if counts else "")]
    lines += [f"Every job: {common}"] if common else []
    lines += [results.console_table(rows, top), ""]
    if top is not None:
        lines.append(f"Best: {top.overrides or '(no overrides)'}: {top.metrics[results.METRIC]:.2f} tokens/s "
                     f"(run {top.run_id}; details: python -m zi_app.best --parent {sweep.parent_run_id})")
    else:
        lines.append("Best: none, no job completed")
    command = results.ui_command(sweep.uri)
    if command:
        lines.append(f"Browse the runs: {command}")
    lines.append(f"This sweep's runs, best first: {results.runs_url(sweep.uri, sweep.experiment_id, sweep.parent_run_id)}")
    if failed:
        lines.append(f"{len(failed)} of {len(rows)} jobs failed.")
    return "\n".join(lines)
