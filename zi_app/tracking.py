"""MLflow: the store, one run per job (params, metrics, tags, artifacts) and failures recorded as data.

Receives plain dicts and files only; knows nothing of torch or DeepSpeed. MLflow itself (about 1.5 s) is
imported when a function first needs it, so that composing the app's config, ``--help`` and tab completion
never pay for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import logging
import os
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Set

if TYPE_CHECKING:
    import mlflow
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
# The process that owns a run, its start time and its host: a RUNNING run whose process is gone (or whose pid
# now names a process started at another time) was killed.
PID_TAG = "zi.pid"
PID_START_TAG = "zi.pid_start"
HOST_TAG = "zi.host"
SIGNAL_TAG = "zi.signal"  # the signal that stopped a run's process (SIGINT, SIGTERM, SIGHUP), when one did
EXIT_STORE_ERROR = 2  # a store that cannot be used is bad input, like a bad config value
STORE_TIMEOUT_S = 5  # how long a tracking server may take to answer the first request before we refuse it
FAILURE_KINDS = ("oom", "invalid-config", "killed", "timeout", "error")
SLURM_JOB_TAG = "zi.slurm_job_id"  # the SLURM job that ran the run, when one did
OFFLOAD_NEEDED_TAG = "zi.offload_needed"  # "false" when every weight fits the GPU budget with offload=none
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")
# Non-GenAI experiment: the UI then opens on the runs table rather than the traces view.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
PARAM_SKIP = ("tracking", "dry_run", "cache_dir", "verbose")  # bookkeeping and display, not the job


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


class StoreError(Exception):
    """An MLflow store that cannot be used: unreachable, read-only, not a database. The message names the
    store and what is wrong, in one line."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def check_store(uri: str, write: bool = True, timeout: float = STORE_TIMEOUT_S) -> None:
    """Refuse a store that cannot work, quickly and before anything loads: a tracking server that does not
    answer within ``timeout`` seconds, a SQLite store whose folder cannot be made or written (``write``)
    or whose file is not a SQLite database. Raises :class:`StoreError`."""
    if uri.startswith(("http://", "https://")):
        try:
            # Without the URI's credentials: any HTTP answer, 401 included, shows a server is there.
            urllib.request.urlopen(f"{public_url(uri).rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered: a server (auth and paths are MLflow's business)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # InvalidURL: a bad port
            reason = getattr(error, "reason", error)
            raise StoreError(f"MLflow tracking server {redact_text(uri)} does not answer within {timeout:g} s "
                             f"({reason})") from None
    if not uri.startswith(SQLITE_PREFIX):
        return
    db = Path(uri[len(SQLITE_PREFIX):])
    if write:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            with open(_lock_path(db), "a"):
                pass
        except OSError as error:
            raise StoreError(f"MLflow store {uri}: cannot write in {db.parent} ({error.strerror})") from None
    if db.is_file() and db.stat().st_size:
        if not os.access(db, os.R_OK | (os.W_OK if write else 0)):
            raise StoreError(f"MLflow store {uri}: cannot {'write' if write else 'read'} {db}")
        try:
            with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"MLflow store {uri}: {db} is not a usable SQLite database ({error})") from None


def _lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local SQLite store: its first use creates and migrates the tables,
    which two processes must not do at once."""
    if not uri.startswith(SQLITE_PREFIX):
        yield
        return
    with open(_lock_path(Path(uri[len(SQLITE_PREFIX):])), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    """Check the store (:func:`check_store`), point MLflow at ``uri`` and return the experiment's id,
    creating the store and the experiment if needed, safely when several processes start at once.

    Raises :class:`StoreError` for a store that cannot be used.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    check_store(uri)
    # "Creating initial MLflow database tables..." on a new store: routine, not worth two lines per store.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        with _store_lock(uri):
            mlflow.set_tracking_uri(uri)
            client = MlflowClient()
            found = client.get_experiment_by_name(experiment)
            if found:
                return found.experiment_id
            try:
                return client.create_experiment(experiment, artifact_location=artifact_root(uri),
                                                tags=EXPERIMENT_TAGS)
            except MlflowException:
                # Another process (through a tracking server, which our lock does not cover) created it
                # between our lookup and create.
                return client.get_experiment_by_name(experiment).experiment_id
    except (MlflowException, SQLAlchemyError, OSError) as error:
        raise StoreError(redact_text(f"MLflow store {uri}: {_first_line(error)}")) from None


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
    from zi_app.schema import ConfigError

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


def out_of_memory(message: str) -> bool:
    """Whether an error's message says a GPU or host allocation failed."""
    return any(m in message.lower() for m in _OOM_MESSAGES)


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


def process_alive(tags: Dict[str, str]) -> Optional[bool]:
    """Whether the process named by a run's tags still runs; None when that cannot be known from here
    (another host, or no process tags). A pid now held by a process started at another time is gone."""
    import psutil

    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return None
    try:
        process = psutil.Process(int(pid))
        started = tags.get(PID_START_TAG)
        if started is not None and abs(process.create_time() - float(started)) > 1:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def search_runs(client, experiment_ids: List[str], filter_string: str) -> list:
    """Every run of the experiments that matches ``filter_string``, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def reap_dead_runs(client, experiment_ids: List[str], message: str,
                   parent_run_id: Optional[str] = None) -> tuple:
    """Mark FAILED (kind ``killed``) the RUNNING runs whose process is gone; return (closed ids, ids of
    ``parent_run_id``'s jobs still running).

    Without ``parent_run_id``: runs whose process is known to be gone (this host, pid not alive). With
    it: also that sweep's jobs whose process cannot be checked (another host), since the sweep is over.
    """
    closed: List[str] = []
    running: Set[str] = set()
    for run in search_runs(client, experiment_ids, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if run.info.run_id == parent_run_id:
            continue
        alive = process_alive(tags)
        ours = parent_run_id is not None and tags.get("mlflow.parentRunId") == parent_run_id
        if alive is False or (ours and alive is None):
            record_failure(run.info.run_id, "killed", f"{message} (process {tags.get(PID_TAG)} on "
                           f"{tags.get(HOST_TAG)}): killed, e.g. by SIGKILL or the kernel's out-of-memory "
                           f"killer, or crashed hard", client=client)
            closed.append(run.info.run_id)
        elif ours:
            running.add(run.info.run_id)
    return closed, running


def close_dead_runs(client, experiment_ids: List[str], when: str) -> List[str]:
    """:func:`reap_dead_runs` for a command starting on the store (``when`` says which, e.g. "when a job
    started"): close the runs left RUNNING by a process that is gone, and say so on stderr."""
    closed, _ = reap_dead_runs(client, experiment_ids, f"found RUNNING with its process gone {when}")
    if closed:
        print(f"MLflow: closed {len(closed)} run(s) left RUNNING by a process that is gone (now FAILED, "
              f"kind killed): {', '.join(closed)}", file=sys.stderr, flush=True)
    return closed


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
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        if run_id_file is not None:
            run_id_file.write_text(run.info.run_id)
        mlflow.log_params(params)
        try:
            yield run
        except BaseException as error:
            record_failure(run.info.run_id, failure_kind(error), f"{type(error).__name__}: {error}",
                           failure_tags(error))
            raise


def start_sweep_run(experiment_id: str, run_name: str, tags: Dict[str, str]) -> str:
    """Create a sweep's parent run (RUNNING, not made the active run) and return its id."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient().create_run(experiment_id, run_name=run_name,
                                    tags={**tags, ROLE_TAG: "sweep", **process_tags()})
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


def log_tags(tags: Dict[str, str]) -> None:
    """Set tags on the active run."""
    import mlflow

    mlflow.set_tags(tags)


def log_metrics(metrics: Dict[str, float], run_id: Optional[str] = None) -> None:
    """Log the job's headline metrics on the active run, or on run ``run_id``: MLflow's active run belongs
    to the thread that started it, and a job of several devices logs its ranks' metrics from another."""
    import mlflow

    values = {k: float(v) for k, v in metrics.items()}
    if run_id is None:
        mlflow.log_metrics(values)
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])
