"""Real servers for the tests, started and stopped by session fixtures: a private PostgreSQL cluster (Debian's
``postgresql`` binaries), an ``mlflow server`` on it with served artifacts, and the same with MLflow's basic-auth
app (the one-node SLURM cluster is in slurm_cluster.py). Each is started on first use and stopped at the end of
the session; nothing is left running. Imported by conftest.py.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

_FOREIGN_RUN_ENV = ("ZI_PARENT_RUN_ID", "MLFLOW_RUN_ID")
SERVER_START_TIMEOUT_S = 240  # the first start creates MLflow's tables (10-35 s on an idle 2-core machine)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ok(cmd: List[str], **kwargs) -> str:
    """Run ``cmd`` (two minutes at most) and return its stdout; fail with its output unless it exits 0."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"$ {' '.join(map(str, cmd))}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def need(path: str, package: str) -> str:
    """``path`` (a command or a file), or fail naming the Debian package that has it."""
    if not shutil.which(path) and not Path(path).exists():
        pytest.fail(f"{path} not found: install Debian's {package} (`tests/run.sh` does: apt-get install {package})")
    return path


@dataclass
class Postgres:
    """A running private PostgreSQL cluster and the role the tests use (password authentication on 127.0.0.1)."""

    root: Path
    bindir: Path
    port: int
    user: str
    password: str

    def as_owner(self, cmd: List[str]) -> List[str]:
        """``cmd`` run as the cluster's owner (``postgres`` when the tests run as root: PostgreSQL refuses root)."""
        return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + [str(c) for c in cmd]

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one SQL statement as the superuser over the cluster's Unix socket."""
        return run_ok(self.as_owner([self.bindir / "psql", "-h", self.root, "-p", self.port, "-U", "postgres", "-d",
                                   database, "-v", "ON_ERROR_STOP=1", "-Atc", statement]), cwd=self.root)

    def create_database(self, name: str) -> str:
        """A new database owned by the test role; returns its SQLAlchemy URI (psycopg2 driver)."""
        self.sql(f'CREATE DATABASE "{name}" OWNER {self.user}')
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"

    def dump(self, database: str) -> str:
        """Everything stored in ``database``, as SQL text."""
        return run_ok(self.as_owner([self.bindir / "pg_dump", "-h", self.root, "-p", self.port, "-U", "postgres",
                                   database]), cwd=self.root)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL cluster (initdb in a scratch folder, its own port and socket), stopped and deleted
    at the end: a system cluster, if any, is left alone."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    bindir = Path(need(found[-1] if found else "/usr/lib/postgresql/15/bin/initdb", "postgresql")).parent
    root = Path(tempfile.mkdtemp(prefix="zi-postgres-"))
    server = Postgres(root, bindir, free_port(), "zi", secrets.token_hex(12))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    try:
        run_ok(server.as_owner([bindir / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
                              "--auth-host=scram-sha-256"]), cwd=root)
        run_ok(server.as_owner([bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
                              f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1", "start"]), cwd=root)
        server.sql(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'")
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            run_ok(server.as_owner([bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"]), cwd=root)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class TrackingServer:
    """A running ``mlflow server``: its URL, its PostgreSQL database, the folder its artifacts land in, and its
    process group (the server and its workers), which a test may stop and continue to stage an outage."""

    url: str
    database: str
    artifacts: Path
    log: Path
    process_group: int


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process (and the workers in its session), SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    """Wait until ``url``/health answers 200; fail with the server's log if it dies or takes too long."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server at {url} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _mlflow_server(postgres: Postgres, root: Path, database: str, args: List[str] = (),
                   env: Optional[Dict[str, str]] = None, host: str = "127.0.0.1",
                   port: Optional[int] = None) -> Tuple[subprocess.Popen, str, Path]:
    """Start ``mlflow server`` on ``host`` on a new PostgreSQL ``database``, serving artifacts from a folder of
    its own, and wait until it answers on 127.0.0.1: (its process, its URL there, its log)."""
    port = port or free_port()
    backend = postgres.create_database(database)
    log = root / "server.log"
    full_env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_RUN_ENV}
    full_env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {}))
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                                    "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
                                    "--host", host, "--port", str(port), "--workers", "1", *args],
                                   cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
    except BaseException:
        _stop(process)
        raise
    return process, url, log


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory) -> Iterator[TrackingServer]:
    """``mlflow server`` on 127.0.0.1 backed by PostgreSQL, serving artifacts from a folder of its own, started as
    README.md says; stopped (with its workers) at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    process, url, log = _mlflow_server(postgres, root, "mlflow")
    try:
        yield TrackingServer(url, "mlflow", root / "artifacts", log, process.pid)
    finally:
        _stop(process)


@dataclass
class AuthServer:
    """A running ``mlflow server --app-name basic-auth``: its URL, its admin's and its users' passwords (alice and
    bob, both with MLflow's default READ permission)."""

    url: str
    admin_password: str
    passwords: Dict[str, str]

    def as_user(self, name: str, password: Optional[str] = None) -> Dict[str, str]:
        """MLflow's credential variables for ``name`` (with ``password``, default the right one)."""
        secret = password if password is not None else self.admin_password if name == "admin" else self.passwords[name]
        return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": secret}


AUTH_CONFIG = """\
[mlflow]
default_permission = READ
database_uri = sqlite:///{root}/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def allowed_hosts(port: int) -> str:
    """The ``--allowed-hosts`` list docs/cluster.md builds (its lines ``PORT=``, ``HOSTS=`` and ``for ip in``, run
    as written), for ``port``."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cluster.md").read_text()
    lines = [line for line in doc.splitlines() if line.startswith(("HOSTS=", "for ip in "))]
    assert len(lines) == 2, "docs/cluster.md no longer builds HOSTS for --allowed-hosts"
    return run_ok(["bash", "-c", "\n".join([f"PORT={port}", *lines, 'echo "$HOSTS"'])]).strip()


@pytest.fixture(scope="session")
def auth_server(postgres, tmp_path_factory) -> Iterator[AuthServer]:
    """``mlflow server --app-name basic-auth`` on PostgreSQL as docs/cluster.md starts it (its users in a SQLite
    file, its admin's password and Flask's secret key from the environment, every address of this machine and the
    docs' ``--allowed-hosts``), with two users made by the admin."""
    root = tmp_path_factory.mktemp("mlflow-auth-server")
    (root / "basic_auth.ini").write_text(AUTH_CONFIG.format(root=root))
    admin_password, port = secrets.token_hex(12), free_port()
    process, url, _ = _mlflow_server(postgres, root, "mlflow_auth", [
        "--app-name", "basic-auth", "--allowed-hosts", allowed_hosts(port)], {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}, host="0.0.0.0", port=port)
    try:
        server = AuthServer(url, admin_password, {"alice": secrets.token_hex(10), "bob": secrets.token_hex(10)})
        for name in server.passwords:  # as an admin adds users (docs/cluster.md), in a process of its own
            run_ok([sys.executable, "-c", "import sys; from mlflow.server import get_app_client; "
                  "get_app_client('basic-auth', tracking_uri=sys.argv[1]).create_user(sys.argv[2], sys.argv[3])",
                  url, name, server.passwords[name]], env={**os.environ, **server.as_user("admin")})
        yield server
    finally:
        _stop(process)
