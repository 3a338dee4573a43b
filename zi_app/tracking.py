"""MLflow: the store, one run per job (params, metrics, tags, artifacts) and failures recorded as data.

Receives plain dicts and files only; knows nothing of torch or DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from zi_app.redaction import public_url, redact, redact_text

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
FAILURE_KIND_TAG = "zi.failure_kind"
FAILURE_MESSAGE_TAG = "zi.failure_message"
OVERRIDES_TAG = "zi.overrides"
PARENT_RUN_ENV = "ZI_PARENT_RUN_ID"
SWEPT_KEYS_ENV = "ZI_SWEPT_KEYS"  # the keys a sweep varies, comma-separated: they name its jobs' runs
RUN_ID_FILE = "mlflow_run_id"  # in a job's output dir: its run id, for whoever records the job after it died
ROLE_TAG = "zi.role"  # "job" on a job's run, "sweep" on a sweep's parent run
PID_TAG = "zi.pid"  # the process that owns the run, and its host: a RUNNING run whose process is gone
HOST_TAG = "zi.host"  # was killed
SLURM_JOB_TAG = "zi.slurm_job_id"  # the SLURM job that ran the run, when one did
FAILURE_KINDS = ("oom", "invalid-config", "killed", "timeout", "error")
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")
# Non-GenAI experiment: the UI then opens on the runs table rather than the traces view.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
PARAM_SKIP = ("tracking", "dry_run", "cache_dir")


def artifact_root(uri: str) -> Optional[str]:
    """Artifact location for a local SQLite store: ``artifacts/`` beside the database file."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(uri[len(SQLITE_PREFIX):]).resolve().parent / "artifacts").as_uri()


def absolute_uri(uri: str, base: Optional[str] = None) -> str:
    """The URI to hand MLflow: a local SQLite store's path made absolute (relative paths start at ``base``,
    else the cwd), a tracking server's ``user:password@`` moved to MLflow's own environment variables."""
    if uri.startswith(("http://", "https://")):
        return _credentials_to_env(uri)
    if not uri.startswith(SQLITE_PREFIX):
        return uri
    return SQLITE_PREFIX + str((Path(base or ".") / uri[len(SQLITE_PREFIX):]).resolve())


def _credentials_to_env(uri: str) -> str:
    """A server URI without its userinfo, whose user and password go to ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (inherited by job processes): MLflow prints the URI it is given in its run
    links, so a password in it would reach the output."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return public_url(uri)


def open_experiment(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` (creating a local SQLite store's folder) and return the experiment id."""
    if uri.startswith(SQLITE_PREFIX):
        Path(uri[len(SQLITE_PREFIX):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifact_root(uri), tags=EXPERIMENT_TAGS)
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(experiment).experiment_id


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dict -> {"a.b.c": value}; lists become JSON strings."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def job_params(config: Dict[str, Any]) -> Dict[str, Any]:
    """MLflow params of a job: the flattened composed config, bookkeeping keys left out, secrets masked."""
    return {k: v for k, v in flatten(redact(config)).items() if not k.startswith(PARAM_SKIP)}


def run_name(overrides: str, fallback: str = "job") -> str:
    """A job run's name: the values of the keys its sweep varies (``batch=64 pin=true``, from
    ``ZI_SWEPT_KEYS``), else all its overrides, else ``fallback``. The full overrides go in a tag."""
    pairs = [item.split("=", 1) for item in overrides.split() if "=" in item]
    values = {key.lstrip("+~"): {"True": "true", "False": "false"}.get(value, value) for key, value in pairs}
    swept = [key for key in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if key in values]
    return " ".join(f"{key}={values[key]}" for key in swept) or overrides or fallback


def failure_kind(error: BaseException) -> str:
    """Classify a job failure: ``oom`` (GPU or host allocation failed), ``invalid-config``, ``killed``,
    ``timeout`` (the scheduler's time limit) or ``error``; an exception may name its kind itself in a ``failure_kind`` attribute (the launcher's
    error for a job process killed by a signal does)."""
    from zi_app.schema import ConfigError

    declared = getattr(error, "failure_kind", None)
    if declared in FAILURE_KINDS:
        return declared
    if isinstance(error, ConfigError):
        return "invalid-config"
    if _scheduler_time_limit(error):
        return "timeout"
    if isinstance(error, MemoryError) or any(m in str(error).lower() for m in _OOM_MESSAGES):
        return "oom"
    return "error"


def _scheduler_time_limit(error: BaseException) -> bool:
    """Whether ``error`` is submitit's notice, raised inside the job when SLURM warns that its time limit is near
    (``signal_delay_s`` before it), that the job timed out and will not be requeued."""
    return type(error).__module__.startswith("submitit") and "timed-out" in str(error)


def process_tags() -> Dict[str, str]:
    """Tags naming this process, so that a run it leaves RUNNING when killed can be recognised, and the SLURM
    job running it, if any."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm_job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")  # as squeue names it
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), **({SLURM_JOB_TAG: slurm_job} if slurm_job else {})}


def process_alive(tags: Dict[str, str]) -> Optional[bool]:
    """Whether the process named by a run's tags still runs; None when that cannot be known from here
    (another host, or no process tags)."""
    import psutil

    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sweep_parent_tags() -> Dict[str, str]:
    """The tag that nests a job's run under its sweep's parent run (id in ``ZI_PARENT_RUN_ID``), if any."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


def record_failure(run_id: str, kind: str, message: str) -> None:
    """Mark a run FAILED with the kind and message of its failure."""
    client = MlflowClient()
    client.set_tag(run_id, FAILURE_KIND_TAG, kind)
    client.set_tag(run_id, FAILURE_MESSAGE_TAG, redact_text(message)[:4000])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


@contextlib.contextmanager
def job_run(experiment_id: str, run_name: str, params: Dict[str, Any], tags: Dict[str, str],
            run_id_file: Optional[Path] = None) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one job; an exception inside marks it FAILED with its kind, then propagates.

    The run id is written to ``run_id_file`` first, so that whoever started this process can mark
    the run FAILED if the process is killed before it can. A parent run id in ``ZI_PARENT_RUN_ID``
    nests the run under a sweep's parent run.
    """
    tags = {**tags, ROLE_TAG: "job", **process_tags(), **sweep_parent_tags()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        if run_id_file is not None:
            run_id_file.write_text(run.info.run_id)
        mlflow.log_params(params)
        try:
            yield run
        except BaseException as error:
            record_failure(run.info.run_id, failure_kind(error), f"{type(error).__name__}: {error}")
            raise


def start_sweep_run(experiment_id: str, run_name: str, tags: Dict[str, str]) -> str:
    """Create a sweep's parent run (RUNNING, not made the active run) and return its id."""
    run = MlflowClient().create_run(experiment_id, run_name=run_name,
                                    tags={**tags, ROLE_TAG: "sweep", **process_tags()})
    return run.info.run_id


def failed_run(experiment_id: str, run_name: str, params: Dict[str, Any], tags: Dict[str, str], kind: str,
               message: str) -> str:
    """Record a job that failed before it could open its own run: a FAILED run holding its config."""
    from mlflow.entities import Param

    client = MlflowClient()
    run_id = client.create_run(experiment_id, run_name=run_name, tags={**tags, ROLE_TAG: "job"}).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    record_failure(run_id, kind, message)
    return run_id


def log_json(obj: Any, name: str) -> None:
    """Store ``obj`` as a JSON artifact of the active run."""
    mlflow.log_dict(obj, name)


def log_text(text: str, name: str) -> None:
    """Store ``text`` as an artifact of the active run."""
    mlflow.log_text(text, name)


def log_metrics(metrics: Dict[str, float]) -> None:
    """Log the job's headline metrics on the active run."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
