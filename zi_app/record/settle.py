"""Jobs whose own process could not record them, recorded by whoever learns of them: the job's callback after
its task failed, the sweep's driver for a job whose process died (or a SLURM job cancelled with its sweep), the
end of the sweep for a job that left its files but no run. A job that failed while the tracking server did not
answer leaves a note in its folder (``mlflow_unrecorded``), so that the end of the sweep records it FAILED with
that reason, or, the server still away, lists it as never recorded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from zi_app.record import runs, store
from zi_app.record.redaction import redact_overrides, redact_text

UNRECORDED_FILE = "mlflow_unrecorded"  # in a job's folder: why its run could not be recorded while it ran
RECORDED_LATE_TAG = "zi.recorded_late"  # "true" on a job's run recorded at the sweep's end, not by the job


class _DiedStarting(RuntimeError):
    """A job whose process ended before it opened its MLflow run."""

    failure_kind = "killed"


class NotRecorded(RuntimeError):
    """A job that failed and could not be recorded while it ran: the tracking server did not answer."""

    failure_kind = "error"


def settle_job(output_dir: Path, job_config: dict, overrides: Sequence[str], error: BaseException,
               launch_dir: Optional[str] = None, tags: Optional[dict] = None) -> None:
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
    tags = {runs.OVERRIDES_TAG: overrides, **runs.sweep_parent_tags(), **(tags or {})}
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


def note_unrecorded(output_dir: Path, error: BaseException) -> None:
    """Leave in the job's folder why its run could not be recorded (secrets masked), for the sweep's end."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / UNRECORDED_FILE).write_text(redact_text(f"{type(error).__name__}: {error}")[:2000])


def settle_unrecorded_jobs(sweep) -> Tuple[List[str], List[str]]:
    """Give a FAILED run to each job of this sweep (``sweep``: its folder, Hydra's output subfolder, its start)
    that left its Hydra files but never opened an MLflow run: its process died while starting, under a
    launcher that does not report dead jobs, or it failed while the tracking server did not answer (its note
    says so; its run is tagged ``zi.recorded_late``). Returns (the overrides of the jobs recorded here after a
    server outage, those that still cannot be recorded)."""
    late: List[str] = []
    lost: List[str] = []
    away = False  # the server did not answer one job: the others are not tried (each try waits for it)
    if sweep.output_subdir is None:
        return late, lost
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
        note = job_dir / UNRECORDED_FILE
        if note.exists():
            error: BaseException = NotRecorded(f"its run could not be recorded while it ran (the tracking server "
                                                f"did not answer), recorded at the sweep's end: {note.read_text()}")
        else:
            error = _DiedStarting(f"the job's process ended before it opened its MLflow run (killed, or crashed "
                                  f"while starting); see {job_dir}")
        try:
            if away:
                raise store.StoreError("the tracking server did not answer")
            settle_job(job_dir, job_config, overrides, error,
                       tags={RECORDED_LATE_TAG: "true"} if note.exists() else None)
        except store.StoreError:
            away = True
            lost.append(redact_overrides(overrides))
            continue
        if note.exists():
            late.append(redact_overrides(overrides))
    return late, lost
