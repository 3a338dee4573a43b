"""Runs left RUNNING by a process that is gone (killed by SIGKILL or the kernel's out-of-memory killer, or
crashed hard): each run names its process (pid, start time, host) and, under SLURM, its job; every command
starting on a store closes such runs FAILED, kind ``killed``. A sweep's parent closed this way is marked for
settling (``zi.settle=pending``): :func:`zi_app.record.sweep_end.settle_dead_sweeps` writes its table and best
run once its jobs have ended.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Dict, List, Optional, Set

from zi_app.record.runs import HOST_TAG, PID_START_TAG, PID_TAG, ROLE_TAG, SLURM_JOB_TAG, record_failure
from zi_app.record.store import search_runs

SETTLE_TAG = "zi.settle"  # on a sweep's parent closed after its driver died: "pending", then "done"


def queued_slurm_jobs() -> Optional[Set[str]]:
    """The ids of the SLURM jobs still queued or running, everyone's (on a shared server the run may be a
    teammate's), as ``squeue`` names them; None without SLURM (or when squeue does not answer)."""
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def process_alive(tags: Dict[str, str], slurm_jobs: Optional[Set[str]] = None) -> Optional[bool]:
    """Whether the process named by a run's tags still runs; None when that cannot be known from here
    (another host, or no process tags). A pid now held by a process started at another time is gone. A run
    of a SLURM job on another host lives as long as its job is queued (``slurm_jobs``: the queued ids, None
    when unknown)."""
    import psutil

    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        slurm_job = tags.get(SLURM_JOB_TAG)
        if slurm_job is None or slurm_jobs is None or not pid.isdigit():
            return None
        return slurm_job in slurm_jobs
    try:
        process = psutil.Process(int(pid))
        started = tags.get(PID_START_TAG)
        if started is not None and abs(process.create_time() - float(started)) > 1:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap_dead_runs(client, experiment_ids: List[str], message: str,
                   parent_run_id: Optional[str] = None) -> tuple:
    """Mark FAILED (kind ``killed``) the RUNNING runs whose process is gone; return (closed ids, ids of
    ``parent_run_id``'s jobs still running).

    Without ``parent_run_id``: runs whose process is known to be gone (this host, pid not alive). With
    it: also that sweep's jobs whose process cannot be checked (another host), since the sweep is over.
    """
    closed: List[str] = []
    running: Set[str] = set()
    found = search_runs(client, experiment_ids, "attributes.status = 'RUNNING'")
    slurm_jobs = queued_slurm_jobs() if any(SLURM_JOB_TAG in run.data.tags for run in found) else None
    for run in found:
        tags = run.data.tags
        if run.info.run_id == parent_run_id:
            continue
        alive = process_alive(tags, slurm_jobs)
        ours = parent_run_id is not None and tags.get("mlflow.parentRunId") == parent_run_id
        if alive is False or (ours and alive is None):
            where = f"SLURM job {tags[SLURM_JOB_TAG]}, " if SLURM_JOB_TAG in tags else ""
            # A sweep's parent whose driver died: its jobs may still run; settled once they have ended.
            settle = {SETTLE_TAG: "pending"} if tags.get(ROLE_TAG) == "sweep" else {}
            record_failure(run.info.run_id, "killed", f"{message} ({where}process {tags.get(PID_TAG)} on "
                           f"{tags.get(HOST_TAG)}): killed, e.g. by SIGKILL or the kernel's out-of-memory "
                           f"killer, or crashed hard", settle, client=client)
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
