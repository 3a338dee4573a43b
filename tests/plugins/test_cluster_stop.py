"""Stopping a ``hydra/launcher=zi_slurm`` sweep on the real one-node SLURM cluster (helpers/slurm_cluster.py),
logging to the real tracking server: a job killed with SIGKILL is settled by the driver, which goes on; Ctrl-C or SIGTERM on
the driver cancels its SLURM jobs, whose runs end ``killed``, and the summary counts them; a driver killed with
SIGKILL leaves its job running, and the next ``zi-best`` settles the sweep once the job has ended. Requests no
partition can run and bad launcher values are refused before anything is submitted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from mlflow.tracking import MlflowClient

from helpers.signals import terminal_signals
from zi_app.record import orphans, runs as zi_runs, sweep_end

TIMEOUT_S = 600
CPU_NODE = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
QUICK = ["prompt_len=8", "warmup=0"]


def start(root: Path, experiment: str, uri: str, *overrides: str, node=tuple(CPU_NODE)) -> subprocess.Popen:
    """A zi_slurm sweep in its own session, as a shell starts it; output to root/out.txt."""
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}
    return subprocess.Popen([sys.executable, "-m", "zi_app", "-m", "hydra/launcher=zi_slurm", *node, *QUICK,
                             *overrides, f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                             "hydra.sweep.dir=sweep"], cwd=root, env=env, start_new_session=True,
                            preexec_fn=terminal_signals, stdout=open(root / "out.txt", "w"), stderr=subprocess.STDOUT)


def output(root: Path) -> str:
    """The sweep's output (stdout and stderr) so far."""
    return (root / "out.txt").read_text()


def job_runs(client: MlflowClient, experiment: str, process: subprocess.Popen, root: Path, count: int,
             generating: bool = True) -> list:
    """Wait until ``count`` job runs of the experiment are RUNNING (and generating: ``load_s`` logged)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        found = client.get_experiment_by_name(experiment)
        running = [] if found is None else [
            run for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
            if run.data.tags.get(zi_runs.ROLE_TAG) == "job" and (not generating or "load_s" in run.data.metrics)]
        if len(running) >= count:
            return running
        time.sleep(0.5)
    pytest.fail(f"{count} job(s) never ran (exit {process.poll()}):\n{output(root)[-3000:]}")


def stopped(sweep: subprocess.Popen, root: Path, stop: Callable[[], None], signum: int) -> str:
    """Call ``stop`` (which ends in a signal to the driver), assert that the driver exits 128 + ``signum`` and
    return its output; a driver still running when the test fails is killed."""
    try:
        stop()
        assert sweep.wait(timeout=TIMEOUT_S) == 128 + signum, output(root)[-3000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    return output(root)


def our_slurm_jobs(root: Path) -> list:
    """The ids of the SLURM jobs the sweep under ``root`` submitted (its sbatch scripts)."""
    return [path.name.split("_")[0] for path in (root / "sweep" / ".submitit").rglob("*_submission.sh")]


def queued(ids: list) -> list:
    """Those of the SLURM jobs ``ids`` still queued or running."""
    listed = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60).stdout.split()
    return [job for job in ids if job in listed]


def test_ctrl_c_cancels_the_sweeps_slurm_jobs_and_counts_them_killed(slurm, tracking_server, tmp_path):
    """Three long jobs on a node that runs two at once: SIGKILL one job's process (the driver settles it and goes
    on), then Ctrl-C the driver: every job still queued or running is cancelled, the runs of those that ran end
    FAILED/killed, the ones that never started count as never run, and nothing stays RUNNING or queued."""
    client = MlflowClient(tracking_server.url)
    sweep = start(tmp_path, "slurm-stop", tracking_server.url, "gen_len=4", "repeat=100000", "seed=0,1,2")

    def kill_a_job_then_ctrl_c() -> None:
        first = job_runs(client, "slurm-stop", sweep, tmp_path, 1)[0]
        os.kill(int(first.data.tags[zi_runs.PID_TAG]), signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_S
        while "ended without a result" not in output(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.5)
        job_runs(client, "slurm-stop", sweep, tmp_path, 1)  # another job generates: the sweep went on
        os.killpg(sweep.pid, signal.SIGINT)

    text = stopped(sweep, tmp_path, kill_a_job_then_ctrl_c, signal.SIGINT)
    assert re.search(r"#\d .*seed=\d.*: FAILED JobProcessError: SLURM job \d+ ended without a result", text), text
    assert "Cancelling " in text and queued(our_slurm_jobs(tmp_path)) == []
    experiment = client.get_experiment_by_name("slurm-stop").experiment_id
    runs = client.search_runs([experiment])
    parent = next(run for run in runs if run.data.tags.get(zi_runs.ROLE_TAG) == "sweep")
    jobs = [run for run in runs if run.data.tags.get(zi_runs.ROLE_TAG) != "sweep"]
    assert {(run.info.status, run.data.tags[zi_runs.FAILURE_KIND_TAG]) for run in jobs} == {("FAILED", "killed")}
    never_ran = int(parent.data.tags.get(sweep_end.NEVER_RAN_TAG, "0"))
    assert len(jobs) >= 2 and len(jobs) + never_ran == 3
    assert (f"Sweep interrupted by SIGINT: {len(jobs)} of 3 jobs ran, {never_ran} never ran; {len(jobs)} failed "
            f"(killed: {len(jobs)})") in text
    assert (parent.info.status, parent.data.tags[zi_runs.FAILURE_KIND_TAG]) == ("FAILED", "killed")


def test_sigterm_to_the_driver_cancels_a_running_and_a_pending_job(slurm, tracking_server, tmp_path):
    """``kill PID`` of the driver while its first job generates and its second waits for the node (each job asks
    both CPUs): the first job's run ends killed by SLURM's SIGTERM, the second never ran, nothing stays queued."""
    client = MlflowClient(tracking_server.url)
    node = [option.replace("cpus_per_task=1", "cpus_per_task=2") for option in CPU_NODE]
    sweep = start(tmp_path, "slurm-term", tracking_server.url, "gen_len=4", "repeat=100000", "seed=0,1", node=node)
    generating = []

    def sigterm_once_a_job_generates() -> None:
        generating.extend(job_runs(client, "slurm-term", sweep, tmp_path, 1))
        os.kill(sweep.pid, signal.SIGTERM)

    text = stopped(sweep, tmp_path, sigterm_once_a_job_generates, signal.SIGTERM)
    assert "Sweep interrupted by SIGTERM: 1 of 2 jobs ran, 1 never ran; 1 failed (killed: 1)" in text, text[-3000:]
    assert queued(our_slurm_jobs(tmp_path)) == [] and len(our_slurm_jobs(tmp_path)) == 2
    job = client.get_run(generating[0].info.run_id)
    assert (job.info.status, job.data.tags[zi_runs.FAILURE_KIND_TAG], job.data.tags[zi_runs.SIGNAL_TAG]) == (
        "FAILED", "killed", "SIGTERM")


def test_a_sweep_whose_driver_died_is_settled_by_the_next_zi_best(slurm, tracking_server, tmp_path):
    """SIGKILL to the driver while its one SLURM job runs: the job goes on and records its run; the next zi-best
    closes the dead parent, writes its table and best run once the job has ended, and ranks it."""
    client = MlflowClient(tracking_server.url)
    sweep = start(tmp_path, "slurm-orphan", tracking_server.url, "gen_len=4", "repeat=1,2")
    job = job_runs(client, "slurm-orphan", sweep, tmp_path, 1, generating=False)[0]
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    deadline = time.monotonic() + TIMEOUT_S
    while queued(our_slurm_jobs(tmp_path)) and time.monotonic() < deadline:
        time.sleep(1)
    assert client.get_run(job.info.run_id).info.status == "FINISHED"
    parent_id = job.data.tags["mlflow.parentRunId"]
    # Nothing wrote its table: its driver was killed (a job starting after that may have closed it, `killed`).
    assert sweep_end.BEST_RUN_TAG not in client.get_run(parent_id).data.tags
    env = {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}
    best = subprocess.run([sys.executable, "-m", "zi_app.zi_best", "--tracking-uri", tracking_server.url,
                           "--parent", parent_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert best.returncode == 0, best.stderr
    settled = [line for line in best.stderr.splitlines() if "whose jobs ended after their driver died: " in line]
    assert len(settled) == 1 and parent_id in settled[0], best.stderr
    parent = client.get_run(parent_id)
    tags = parent.data.tags
    assert (parent.info.status, tags[zi_runs.FAILURE_KIND_TAG], tags[orphans.SETTLE_TAG]) == ("FAILED", "killed",
                                                                                                "done")
    jobs = [run for run in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")]
    top = max((run for run in jobs if run.info.status == "FINISHED"), key=lambda r: r.data.metrics["tokens_per_sec"])
    assert tags[sweep_end.BEST_RUN_TAG] == top.info.run_id and tags[sweep_end.JOBS_TAG] == str(len(jobs))
    assert {a.path for a in client.list_artifacts(parent_id)} == set(sweep_end.ARTIFACTS.values())
    assert f"UNFINISHED sweep {parent_id}" in best.stdout and "settled once its jobs had ended" in best.stdout


@pytest.mark.parametrize("overrides, asked", [
    (["devices=2", "hydra.launcher.gpus_per_node=auto"], "2 GPUs"),
    (["hydra.launcher.mem_gb=100000"], "100000 GB"),
], ids=["gpus", "memory"])
def test_a_request_no_partition_can_run_is_refused_before_submission(slurm, tracking_server, tmp_path, overrides,
                                                                      asked):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    sweep = start(tmp_path, "slurm-refused", tracking_server.url, "gen_len=4", "repeat=1,2",
                  "hydra.launcher.timeout_min=1", *overrides)
    assert sweep.wait(timeout=TIMEOUT_S) == 2, output(tmp_path)[-3000:]
    text = output(tmp_path)
    refusal = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(refusal) == 1 and "Traceback" not in text, text
    assert refusal[0].startswith("error: hydra.launcher: job #0 (") and "asks SLURM for " in refusal[0]
    assert f"{asked}, " in refusal[0].split("asks SLURM for ", 1)[1]
    assert "which no partition can run: no node offers that (test: 0 GPUs" in refusal[0]
    # timeout_min=1: SLURM's warning, 120 s before the time limit, would come before the job starts
    assert "warning: hydra.launcher.signal_delay_s=120 is not below half the time limit (timeout_min=1: 60 s)" in text
    assert not (tmp_path / "sweep" / ".submitit").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_a_bad_launcher_value_is_refused_in_one_line(slurm, tracking_server, tmp_path):
    sweep = start(tmp_path, "slurm-bad", tracking_server.url, "gen_len=4", "repeat=1,2", "hydra.launcher.mem_gb=lots")
    assert sweep.wait(timeout=TIMEOUT_S) == 2, output(tmp_path)[-3000:]
    refusal = [line for line in output(tmp_path).splitlines() if line.startswith("error:")]
    assert refusal == ["error: invalid config: hydra.launcher.mem_gb='lots' is not allowed: auto (the plan's host "
                       "peak x mem_margin), GiB, or null (the node's default)"], output(tmp_path)[-3000:]
    assert "Traceback" not in output(tmp_path) and not (tmp_path / "sweep" / ".submitit").exists()
