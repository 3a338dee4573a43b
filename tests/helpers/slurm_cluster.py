"""A one-node SLURM cluster for the tests (Debian's ``slurm-wlm`` and ``munge``), started by a session fixture on
first use and shut down at the end of the session, its jobs cancelled: nothing is left running. Imported by
conftest.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from helpers.services import free_port, need, run_ok


@dataclass
class SlurmCluster:
    """A running one-node SLURM cluster; ``SLURM_CONF`` points this process and its children at it."""

    root: Path
    conf: Path

    def scontrol(self, *args: str) -> str:
        return run_ok(["scontrol", *args])


SLURM_CONF = """\
# A one-node SLURM cluster for the tests, everything under {root}; no cgroups, no accounting (finished jobs stay
# in `scontrol show job` for MinJobAge seconds instead: the tests read their state and exit code there).
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
MinJobAge=3600
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
        need(shutil.which(daemon) or f"/usr/sbin/{daemon}", "slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.fail("the SLURM test cluster runs slurmd as root: run the tests as root (CI does)")
    root = Path(tempfile.mkdtemp(prefix="zi-slurm-"))
    root.chmod(0o755)  # munged, as user munge, reaches its folder through it
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir()
    shutil.chown(root / "munge", "munge", "munge")
    host = socket.gethostname().split(".")[0]
    memory = int(re.search(r"RealMemory=(\d+)", run_ok(["slurmd", "-C"])).group(1)) - 1024
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, host=host, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count(), memory=memory))
    munge_pid = root / "munge" / "munged.pid"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        run_ok(["runuser", "-u", "munge", "--", "munged", f"--socket={root}/munge/munge.socket",
              f"--pid-file={munge_pid}", f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed"])
        run_ok(["slurmctld"])
        run_ok(["slurmd"])
        deadline = time.monotonic() + 60
        while "idle" not in run_ok(["sinfo", "-h", "-o", "%T"]):
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
