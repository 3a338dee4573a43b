"""One MLflow run per job: its params, tags, metrics and artifacts, and its failure recorded as data (kind and
message); a sweep's parent run; and the finished runs read back for calibration. Receives plain dicts and
files only; knows nothing of torch or DeepSpeed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

if TYPE_CHECKING:
    import mlflow
    from mlflow.tracking import MlflowClient

from zi_app.config.checks import ConfigError
from zi_app.record.redaction import redact, redact_text
from zi_app.record.store import search_runs
from zi_app.run.failure import out_of_memory

FAILURE_KIND_TAG = "zi.failure_kind"
FAILURE_MESSAGE_TAG = "zi.failure_message"
OVERRIDES_TAG = "zi.overrides"
PARENT_RUN_ENV = "ZI_PARENT_RUN_ID"
SWEPT_KEYS_ENV = "ZI_SWEPT_KEYS"  # the keys a sweep varies, comma-separated: they name its jobs' runs
RUN_ID_FILE = "mlflow_run_id"  # in a job's output dir: its run id, for whoever records the job after it died
ROLE_TAG = "zi.role"  # "job" on a job's run, "sweep" on a sweep's parent run
# The process that owns a run, its start time and its host: a RUNNING run whose process is gone (or whose pid
# now names a process started at another time) was killed (zi_app.record.orphans).
PID_TAG = "zi.pid"
PID_START_TAG = "zi.pid_start"
HOST_TAG = "zi.host"
SLURM_JOB_TAG = "zi.slurm_job_id"  # the SLURM job that ran the run, when one did
SIGNAL_TAG = "zi.signal"  # the signal that stopped a run's process (SIGINT, SIGTERM, SIGHUP), when one did
FAILURE_KINDS = ("oom", "invalid-config", "killed", "timeout", "error")
OFFLOAD_NEEDED_TAG = "zi.offload_needed"  # "false" when every weight fits the GPU budget with offload=none
PARAM_SKIP = ("tracking", "dry_run", "cache_dir", "verbose")  # bookkeeping and display, not the job
CONFIG_ARTIFACT = "config.yaml"  # a job's validated config (its spec's keys), secrets masked


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
    ``timeout`` (the scheduler's time limit) or ``error``; an exception may name its kind itself in a
    ``failure_kind`` attribute (the launcher's error for a job process killed by a signal does)."""
    declared = getattr(error, "failure_kind", None)
    if declared in FAILURE_KINDS:
        return declared
    if isinstance(error, KeyboardInterrupt):  # SIGINT before our handler was installed: the same cause
        return "killed"
    if isinstance(error, ConfigError):
        return "invalid-config"
    if _scheduler_time_limit(error):
        return "timeout"
    if isinstance(error, MemoryError) or out_of_memory(str(error)):
        return "oom"
    return "error"


def _scheduler_time_limit(error: BaseException) -> bool:
    """Whether ``error`` is submitit's notice, raised inside the job when SLURM warns that its time limit is near
    (``signal_delay_s`` before it), that the job timed out and will not be requeued."""
    return type(error).__module__.startswith("submitit") and "timed-out" in str(error)


def process_tags() -> Dict[str, str]:
    """Tags naming this process (pid, start time, host), so that a run it leaves RUNNING when killed can
    be recognised, also after its pid was reused; and the SLURM job running it, if any."""
    import psutil

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm_job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")  # as squeue names it
    return {PID_TAG: str(os.getpid()), PID_START_TAG: repr(psutil.Process().create_time()),
            HOST_TAG: socket.gethostname(), **({SLURM_JOB_TAG: slurm_job} if slurm_job else {})}


def sweep_parent_tags() -> Dict[str, str]:
    """The tag that nests a job's run under its sweep's parent run (id in ``ZI_PARENT_RUN_ID``), if any."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return {"mlflow.parentRunId": parent} if parent else {}


def failure_tags(error: BaseException) -> Dict[str, str]:
    """Tags a failure adds beyond its kind and message: the signal that stopped the process, if any."""
    name = getattr(error, "signal_name", None)
    if name is None and isinstance(error, KeyboardInterrupt):
        name = "SIGINT"
    return {SIGNAL_TAG: name} if name else {}


def record_failure(run_id: str, kind: str, message: str, tags: Optional[Dict[str, str]] = None,
                   client: Optional["MlflowClient"] = None) -> None:
    """Mark a run FAILED with the kind and message of its failure (and any further ``tags``)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    tags = {FAILURE_KIND_TAG: kind, FAILURE_MESSAGE_TAG: redact_text(message)[:4000], **(tags or {})}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


@contextlib.contextmanager
def job_run(experiment_id: str, run_name: str, params: Dict[str, Any], tags: Dict[str, str],
            run_id_file: Optional[Path] = None) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one job; an exception inside marks it FAILED with its kind, then propagates.

    The run id is written to ``run_id_file`` first, so that whoever started this process can mark
    the run FAILED if the process is killed before it can. A parent run id in ``ZI_PARENT_RUN_ID``
    nests the run under a sweep's parent run.
    """
    import mlflow

    tags = {**tags, ROLE_TAG: "job", **process_tags(), **sweep_parent_tags()}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    try:
        if run_id_file is not None:
            run_id_file.write_text(run.info.run_id)
        mlflow.log_params(params)
        yield run
    except BaseException as error:
        # A store that refuses this write too (a full disk) keeps the run RUNNING, for the next command on the
        # store to close (its process is gone); the job's own error is the one to report.
        with contextlib.suppress(Exception):
            record_failure(run.info.run_id, failure_kind(error), f"{type(error).__name__}: {error}",
                           failure_tags(error))
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


def start_sweep_run(experiment_id: str, run_name: str, tags: Dict[str, str]) -> str:
    """Create a sweep's parent run (RUNNING, not made the active run) and return its id."""
    from mlflow.tracking import MlflowClient

    from mlflow.tracking.context.default_context import _get_user
    from mlflow.utils.mlflow_tags import MLFLOW_USER

    # The client sets no mlflow.user (only mlflow.start_run does): zi-best picks this user's latest sweep by it.
    run = MlflowClient().create_run(experiment_id, run_name=run_name,
                                    tags={**tags, ROLE_TAG: "sweep", MLFLOW_USER: _get_user(), **process_tags()})
    return run.info.run_id


def failed_run(experiment_id: str, run_name: str, params: Dict[str, Any], tags: Dict[str, str], kind: str,
               message: str) -> str:
    """Record a job that failed before it could open its own run: a FAILED run holding its config."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = client.create_run(experiment_id, run_name=run_name, tags={**tags, ROLE_TAG: "job"}).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    record_failure(run_id, kind, message)
    return run_id


def log_json(obj: Any, name: str) -> None:
    """Store ``obj`` as a JSON artifact of the active run."""
    import mlflow

    mlflow.log_dict(obj, name)


def log_text(text: str, name: str) -> None:
    """Store ``text`` as an artifact of the active run."""
    import mlflow

    mlflow.log_text(text, name)


PROFILE_ARTIFACTS = "profile"  # the profiled decode step's traces (``profile_step=true``)


def log_trace(events: List[dict], name: str) -> None:
    """Store Chrome-trace events as ``profile/<name>.json.gz`` of the active run (Perfetto and
    chrome://tracing open it); gzipped because a step traced with Python calls holds many thousands."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json.gz"
        with gzip.open(path, "wt") as handle:
            json.dump({"traceEvents": events}, handle)
        mlflow.log_artifact(str(path), artifact_path=PROFILE_ARTIFACTS)


def log_tags(tags: Dict[str, str]) -> None:
    """Set tags on the active run."""
    import mlflow

    mlflow.set_tags(tags)


def in_gib(metrics: Dict[str, float]) -> Dict[str, float]:
    """Each ``*_bytes`` metric again as ``*_gib``, rounded to 0.01 GiB: what the MLflow UI's columns show a
    person (``peak_host_rss_bytes`` 2147483648 is ``peak_host_rss_gib`` 2.0); the bytes stay for tools."""
    return {f"{key[:-len('_bytes')]}_gib": round(value / 2**30, 2) for key, value in metrics.items()
            if key.endswith("_bytes")}


RATE_DIGITS = 4  # significant digits a measured rate is logged with: a timed run varies by more than 0.05%


def rounded_rates(metrics: Dict[str, float]) -> Dict[str, float]:
    """``metrics`` with each measured rate (``*_per_sec``) rounded to :data:`RATE_DIGITS` significant digits,
    which is what the MLflow UI's columns show as they are (164.5 tokens/s, not 164.48392018). Predictions
    (``predicted_*``) stay exact: tests compare them with the planner's own figures."""
    def rounded(value: float) -> float:
        return float(f"{value:.{RATE_DIGITS}g}") if math.isfinite(value) and value else value
    return {key: rounded(value) if key.endswith("_per_sec") and not key.startswith("predicted_") else value
            for key, value in metrics.items()}


def log_metrics(metrics: Dict[str, float], run_id: Optional[str] = None) -> None:
    """Log the job's headline metrics on the active run, or on run ``run_id``: MLflow's active run belongs
    to the thread that started it, and a job of several devices logs its ranks' metrics from another."""
    import mlflow

    values = rounded_rates({k: float(v) for k, v in metrics.items()})
    values.update(in_gib(values))
    if run_id is None:
        mlflow.log_metrics(values)
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])


def measured_runs(uri: str, experiment: str) -> list:
    """Every FINISHED job run of ``experiment`` in the store at ``uri`` as the planner's calibration takes it
    (:class:`zi_app.plan.calibrate.MeasuredRun`: its logged config, metrics and device tag); raises
    :class:`LookupError` when the experiment does not exist."""
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from zi_app.plan.calibrate import MeasuredRun

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no experiment {experiment!r} in {uri}")
    runs = []
    for run in search_runs(client, [found.experiment_id], "attributes.status = 'FINISHED'"):
        if run.data.tags.get(ROLE_TAG, "job") != "job":
            continue
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
        runs.append(MeasuredRun(yaml.safe_load(text), dict(run.data.metrics), run.data.tags.get("device", "")))
    return runs
