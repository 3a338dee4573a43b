"""The MLflow store: its URI made absolute, checked quickly before anything loads, created with its
experiment safely when several processes start at once (a new SQLite store's tables made in a file of their
own and renamed into place, so that a signal never leaves it half-made), and searched. MLflow itself (about 1.5 s) is imported
when a function first needs it, so that composing the app's config, ``--help`` and tab completion never pay
for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator, List, Optional

from zi_app.record import server
from zi_app.record.redaction import public_url, redact_text

SQLITE_PREFIX = "sqlite:///"
EXIT_STORE_ERROR = 2  # a store that cannot be used is bad input, like a bad config value
MIN_FREE_BYTES = 16 * 2**20  # free disk a store needs to record a job: its rows, journal and small artifacts
# Non-GenAI experiment: the UI then opens on the runs table rather than the traces view.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def artifact_root(uri: str) -> Optional[str]:
    """Artifact location for a local SQLite store: ``artifacts/`` beside the database file."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(uri[len(SQLITE_PREFIX):]).resolve().parent / "artifacts").as_uri()


def absolute_uri(uri: str, base: Optional[str] = None) -> str:
    """The URI to hand MLflow: a local SQLite store's path made absolute (relative paths start at ``base``,
    else the cwd), a tracking server's ``user:password@`` moved to MLflow's own environment variables."""
    if uri.startswith(("http://", "https://")):
        server.mlflow_client_defaults()
        return _credentials_to_env(uri)
    if not uri.startswith(SQLITE_PREFIX):
        return uri
    return SQLITE_PREFIX + str((Path(base or ".") / uri[len(SQLITE_PREFIX):]).resolve())


class StoreError(Exception):
    """An MLflow store that cannot be used: unreachable, read-only, not a database. The message names the
    store and what is wrong, in one line."""


def access_refused(error: BaseException, uri: Optional[str] = None) -> Optional[StoreError]:
    """A tracking server's refusal of this user (MLflow's basic-auth app, or a proxy) as one line: 401, no or
    wrong credentials; 403, a user without the permission (MLflow gives a new user READ only). None for any
    other error. ``uri``: the server (default: MLflow's current tracking URI)."""
    code = getattr(error, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    server = f"MLflow tracking server {public_url(uri)}"
    if code == "UNAUTHENTICATED":
        who = f"user {user!r}: wrong password" if user else "a request without credentials"
        return StoreError(f"{server} refused {who} (401 Unauthenticated); set MLFLOW_TRACKING_USERNAME and "
                          f"MLFLOW_TRACKING_PASSWORD to an account of that server")
    return StoreError(f"{server}: user {user or 'anonymous'!r} may not write there (403 Permission denied: MLflow gives a new user "
                      f"READ only); the experiment's owner or an admin must give it EDIT permission (docs/cluster.md)")


def first_line(error: BaseException) -> str:
    """``ErrorType: the first line of its message``: an error of MLflow or SQLAlchemy in one line; where the
    message quotes the database driver's own words (``(sqlite3.OperationalError) unable to open database
    file``), that line, which says what happened, not SQLAlchemy's preamble."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    driver = next((line for line in lines if re.match(r"\(\w+(\.\w+)*\) ", line)), None)
    return f"{type(error).__name__}: {driver or (lines[0] if lines else '')}"


def check_store(uri: str, write: bool = True, wait_s: float = 0.0) -> None:
    """Refuse a store that cannot work, quickly and before anything loads: a tracking server that does not
    answer or whose API fails (retried for up to ``wait_s`` seconds, :func:`server.wait`), a SQLite store
    whose folder cannot be made or written or whose disk is full (``write``), whose file is not a SQLite
    database, is damaged or was left half-created. Raises :class:`StoreError`."""
    if uri.startswith(("http://", "https://")):
        refused = server.wait(uri, wait_s)
        if refused is not None:
            raise StoreError(refused)
    if not uri.startswith(SQLITE_PREFIX):
        return
    db = Path(uri[len(SQLITE_PREFIX):])
    if write:
        _check_writable(uri, db)
    if db.is_file() and db.stat().st_size:
        if not os.access(db, os.R_OK | (os.W_OK if write else 0)):
            raise StoreError(f"MLflow store {uri}: cannot {'write' if write else 'read'} {db}")
        try:
            with _read_only(db) as connection:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
                # A damaged page is otherwise met by whichever query reads it first, as a traceback.
                damage = connection.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.Error as error:
            raise StoreError(f"MLflow store {uri}: {db} is not a usable SQLite database ({error})") from None
        if damage != "ok":
            damage = " ".join(line for line in damage.splitlines() if not line.startswith("***"))  # one line
            raise StoreError(f"MLflow store {uri}: {db} is damaged (sqlite's quick_check: {damage}); restore it "
                             f"from a backup, or keep what can be read: sqlite3 {db} .recover | sqlite3 "
                             f"{db.with_name('recovered.db')}")
        _check_complete(uri, db)


def _check_writable(uri: str, db: Path) -> None:
    """Refuse a store whose folder cannot be made or written in, or whose disk is full: SQLite writes a
    journal beside the database (an immutable or read-only folder with a database in it fails there, at
    the first run's insert), and a full disk fails the first insert too."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(_lock_path(db), "a"):
            pass
        with tempfile.TemporaryFile(dir=db.parent):
            pass
    except OSError as error:
        raise StoreError(f"MLflow store {uri}: cannot write in {db.parent} ({error.strerror})") from None
    free = shutil.disk_usage(db.parent).free
    if free < MIN_FREE_BYTES:
        raise StoreError(f"MLflow store {uri}: the disk holding {db.parent} is full ({free / 2**20:.1f} MiB free; "
                         f"a job's run and artifacts need about {MIN_FREE_BYTES // 2**20} MiB)")


def _read_only(db: Path):
    """A read-only connection to the SQLite file ``db``, closed at the end of a ``with`` block."""
    return contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True))


def _tables(db: Path) -> List[str]:
    with _read_only(db) as connection:
        return [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def _half_created(db: Path) -> Optional[str]:
    """Why the SQLite store ``db`` was left half-created (its tables made by an older version that a signal
    stopped part way: some tables, an alembic work table, no schema version), or None."""
    tables = _tables(db)
    if not tables:
        return None  # no tables at all: created afresh
    if any(name.startswith("_alembic_tmp_") for name in tables):
        return "a schema migration's work table is left in it"
    if "alembic_version" not in tables:
        return "it has tables but no schema version"
    with _read_only(db) as connection:
        if not connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0]:
            return "its schema version is empty"
    return None


def _check_complete(uri: str, db: Path) -> None:
    """Refuse, in one line with what to do, a store an older version left half-created."""
    why = _half_created(db)
    if why is None:
        return
    with _read_only(db) as connection:
        has_runs = "runs" in _tables(db) and connection.execute("SELECT count(*) FROM runs").fetchone()[0]
    todo = (f"run `mlflow db upgrade {uri}` (it holds runs)" if has_runs else
            f"it holds no runs: move it away (mv {db} {db}.broken) and run the command again")
    raise StoreError(f"MLflow store {uri}: {db} was left half-created by a command stopped while it made the "
                     f"tables ({why}); {todo}")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back from this thread until the block ends, then delivered."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only: nothing to defer here
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _create(uri: str, db: Path) -> None:
    """Make a new SQLite store's tables (MLflow's schema and its migrations: seconds) in a file of their own
    beside ``db``, then rename it into place: a stop at any moment leaves no store or a whole one (the caller
    defers signals meanwhile; one that reaches another thread still only loses the temporary file)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    temporary = db.with_name(f".{db.name}.{os.getpid()}.creating")
    try:
        SqlAlchemyStore(SQLITE_PREFIX + str(temporary), artifact_root(uri)).engine.dispose()
        os.replace(temporary, db)
    finally:
        temporary.unlink(missing_ok=True)


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


def open_experiment(uri: str, experiment: str, wait_s: float = 0.0) -> str:
    """Check the store (:func:`check_store`, waiting up to ``wait_s`` seconds for a tracking server), point
    MLflow at ``uri`` and return the experiment's id, creating the store and the experiment if needed, safely
    when several processes start at once.

    Raises :class:`StoreError` for a store that cannot be used.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    check_store(uri, wait_s=wait_s)
    # "Creating initial MLflow database tables..." on a new store: routine, not worth two lines per store. Its
    # ERROR lines repeat, with a traceback, a database error that reaches us anyway and is said in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # A signal is taken once a local store is open, not inside SQLAlchemy: one handled in its pool's weakref
    # callbacks is swallowed there and leaves the session's transaction invalid, so that the next statement
    # fails (PendingRollbackError) and a stopped job exits with a store error (seen in 2 of 43 stops 0.8-1.4 s into
    # a new store's first use). A tracking server's calls are HTTP and stay interruptible.
    local = uri.startswith(SQLITE_PREFIX)
    try:
        with _signals_deferred() if local else contextlib.nullcontext(), _store_lock(uri):
            if local:
                db = Path(uri[len(SQLITE_PREFIX):])
                if not db.is_file() or not _tables(db):
                    _create(uri, db)
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
    except (MlflowException, SQLAlchemyError, OSError, sqlite3.Error) as error:
        raise access_refused(error, uri) or StoreError(redact_text(f"MLflow store {uri}: {first_line(error)}")) \
            from None


def search_runs(client, experiment_ids: List[str], filter_string: str) -> list:
    """Every run of the experiments that matches ``filter_string``, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
