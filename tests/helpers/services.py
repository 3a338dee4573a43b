"""Real servers for the tests, started and stopped by session fixtures: a private PostgreSQL cluster (Debian's
``postgresql`` binaries), an ``mlflow server`` on it with served artifacts, and a one-node SLURM cluster
(Debian's ``slurm-wlm`` and ``munge``). Each is started on first use and stopped at the end of the session;
nothing is left running. Imported by conftest.py.
"""

from __future__ import annotations

import glob
import os
import re
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
from typing import Iterator, List

import pytest

_FOREIGN_RUN_ENV = ("ZI_PARENT_RUN_ID", "MLFLOW_RUN_ID")
SERVER_START_TIMEOUT_S = 240  # the first start creates MLflow's tables (10-35 s on an idle 2-core machine)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: List[str], **kwargs) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"$ {' '.join(map(str, cmd))}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _need(path: str, package: str) -> str:
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
        return _run(self.as_owner([self.bindir / "psql", "-h", self.root, "-p", self.port, "-U", "postgres", "-d",
                                   database, "-v", "ON_ERROR_STOP=1", "-Atc", statement]), cwd=self.root)

    def create_database(self, name: str) -> str:
        """A new database owned by the test role; returns its SQLAlchemy URI (psycopg2 driver)."""
        self.sql(f'CREATE DATABASE "{name}" OWNER {self.user}')
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"

    def dump(self, database: str) -> str:
        """Everything stored in ``database``, as SQL text."""
        return _run(self.as_owner([self.bindir / "pg_dump", "-h", self.root, "-p", self.port, "-U", "postgres",
                                   database]), cwd=self.root)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL cluster (initdb in a scratch folder, its own port and socket), stopped and deleted
    at the end: a system cluster, if any, is left alone."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    bindir = Path(_need(found[-1] if found else "/usr/lib/postgresql/15/bin/initdb", "postgresql")).parent
    root = Path(tempfile.mkdtemp(prefix="zi-postgres-"))
    server = Postgres(root, bindir, free_port(), "zi", secrets.token_hex(12))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    try:
        _run(server.as_owner([bindir / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
                              "--auth-host=scram-sha-256"]), cwd=root)
        _run(server.as_owner([bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
                              f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1", "start"]), cwd=root)
        server.sql(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'")
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            _run(server.as_owner([bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"]), cwd=root)
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


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory) -> Iterator[TrackingServer]:
    """``mlflow server`` on 127.0.0.1 backed by PostgreSQL, serving artifacts from a folder of its own, started as
    README.md says; stopped (with its workers) at the end of the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    database = "mlflow"
    backend = postgres.create_database(database)
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_RUN_ENV}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                                    "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
                                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                   cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield TrackingServer(url, database, root / "artifacts", log, process.pid)
    finally:
        _stop(process)


@dataclass
class SlurmCluster:
    """A running one-node SLURM cluster; ``SLURM_CONF`` points this process and its children at it."""

    root: Path
    conf: Path

    def scontrol(self, *args: str) -> str:
        return _run(["scontrol", *args])


SLURM_CONF = """\
# A one-node SLURM cluster for the tests, everything under {root}; no cgroups, no accounting.
ClusterName=zi-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path) -> int:
    return int(path.read_text().split()[0]) if path.exists() else 0


def _wait_gone(pid: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _cancel_jobs(seconds: float = 60) -> None:
    """Cancel every job of the test cluster and wait until none is left (slurmstepd outlives slurmd)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60).stdout.split()
        if not jobs:
            return
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
        time.sleep(1)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A one-node SLURM cluster (Debian's slurm-wlm): its own munged (as user munge, own socket), slurmctld and
    slurmd (as root) with a scratch slurm.conf; ``SLURM_CONF`` set for the session. Shut down at the end."""
    for daemon in ("munged", "slurmctld", "slurmd"):
        _need(shutil.which(daemon) or f"/usr/sbin/{daemon}", "slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.fail("the SLURM test cluster runs slurmd as root: run the tests as root (CI does)")
    root = Path(tempfile.mkdtemp(prefix="zi-slurm-"))
    root.chmod(0o755)  # munged, as user munge, reaches its folder through it
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir()
    shutil.chown(root / "munge", "munge", "munge")
    host = socket.gethostname().split(".")[0]
    memory = int(re.search(r"RealMemory=(\d+)", _run(["slurmd", "-C"])).group(1)) - 1024
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, host=host, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count(), memory=memory))
    munge_pid = root / "munge" / "munged.pid"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        _run(["runuser", "-u", "munge", "--", "munged", f"--socket={root}/munge/munge.socket",
              f"--pid-file={munge_pid}", f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"])
        _run(["slurmctld"])
        _run(["slurmd"])
        deadline = time.monotonic() + 60
        while "idle" not in _run(["sinfo", "-h", "-o", "%T"]):
            if time.monotonic() > deadline:
                pytest.fail(f"the SLURM node never became idle:\n{(root / 'slurmctld.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield SlurmCluster(root, conf)
    finally:
        _cancel_jobs()
        daemons = [_pid(root / "slurmctld.pid"), _pid(root / "slurmd.pid")]
        subprocess.run(["scontrol", "shutdown"], capture_output=True, timeout=60)
        for pid in daemons:
            _wait_gone(pid)
        munged = _pid(munge_pid)
        if munged:
            os.kill(munged, signal.SIGTERM)
            _wait_gone(munged)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(root, ignore_errors=True)
