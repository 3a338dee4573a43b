"""A sweep on a real one-node SLURM cluster (session fixture in helpers/slurm_cluster.py) through our
``hydra/launcher=zi_slurm`` launcher (submitit), logging to the real tracking server: one job completes, one is
refused by its plan in the driver and takes no SLURM allocation, one runs past its SLURM time limit; the parent
run gets the table, plot and best run; each job is its own SLURM job, named by what it runs, with the memory its
plan predicts, and a failed job ends FAILED with exit code 1 for SLURM. The tracking credentials travel in MLflow's
environment variables and reach no file of the sweep and no output; a password in the tracking URI is refused
before anything is written or submitted. tests/plugins/test_cluster_stop.py stops sweeps and their jobs."""

from __future__ import annotations

import math
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from zi_app.record import runs as zi_runs, sweep_end

TIMEOUT_S = 900
EXPERIMENT = "slurm-sweep"
# The test node has no GPU and two CPUs: no GPU asked, one CPU per job; memory sized by the plan (auto).
CPU_NODE = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
QUICK = ["prompt_len=8", "gen_len=4", "warmup=0"]


def lower_time_limit_while_generating(client: MlflowClient, root: Path, job: int, sweep: subprocess.Popen,
                                      slurm) -> str:
    """Once job ``job`` generates (its run has ``load_s``), cut its SLURM time limit to one minute past the whole
    minutes it has used: inside the launcher's signal delay, so SLURM warns it at once and ends it within a minute
    as it would any job that reaches ``--time``. (A limit already passed gets the warning and the kill in the same
    pass of slurmctld, and under load the kill won: the job ended TIMEOUT 0:15, recorded killed.) Returns the
    SLURM job id."""
    run_file = root / "sweep" / str(job) / zi_runs.RUN_ID_FILE
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and sweep.poll() is None:
        if run_file.exists() and run_file.read_text():
            run = client.get_run(run_file.read_text())
            if "load_s" in run.data.metrics:
                slurm_job = run.data.tags[zi_runs.SLURM_JOB_TAG]
                hours, minutes, seconds = re.search(r"RunTime=(?:\d+-)?(\d+):(\d+):(\d+)",
                                                    slurm.scontrol("show", "job", slurm_job)).groups()
                used = -(-(int(hours) * 3600 + int(minutes) * 60 + int(seconds)) // 60)
                slurm.scontrol("update", f"JobId={slurm_job}", f"TimeLimit={used + 1}")
                return slurm_job
        time.sleep(0.5)
    pytest.fail(f"job {job} never started generating:\n{(root / 'stderr.txt').read_text()[-3000:]}")


@pytest.fixture(scope="module")
def slurm_sweep(slurm, tracking_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-sweep")
    password = f"p@ss {secrets.token_hex(8)}"  # an '@' and a space: both once leaked a part of it
    env = {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}
    env.update(MLFLOW_TRACKING_USERNAME="zi", MLFLOW_TRACKING_PASSWORD=password)
    # repeat=0 fails validation; repeat=100000 generates far longer than any time limit here.
    sweep = subprocess.Popen([sys.executable, "-m", "zi_app", "-m", "hydra/launcher=zi_slurm", *CPU_NODE,
                              "repeat=1,0,100000", *QUICK,
                              f"tracking.uri={tracking_server.url}", f"tracking.experiment={EXPERIMENT}",
                              "hydra.sweep.dir=sweep"], cwd=root, env=env, stdout=open(root / "stdout.txt", "w"),
                             stderr=open(root / "stderr.txt", "w"))
    client = MlflowClient(tracking_server.url)
    try:
        slurm_job = lower_time_limit_while_generating(client, root, 2, sweep, slurm)
        sweep.wait(timeout=TIMEOUT_S)
    finally:
        if sweep.poll() is None:  # the test failed: stop the sweep (the cluster's fixture cancels its jobs)
            sweep.kill()
            sweep.wait()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(run for run in runs if run.data.tags.get(zi_runs.ROLE_TAG) == "sweep")
    jobs = {run.data.tags[zi_runs.OVERRIDES_TAG].split()[0]: run for run in runs
            if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return root, sweep.returncode, (root / "stdout.txt").read_text(), client, parent, jobs, slurm_job, password


def files_holding(root: Path, secret: str) -> list:
    """Every file under ``root`` (Hydra's files, submitit's pickles, scripts and logs, the outputs) holding
    ``secret`` or its tail after the '@' or the space."""
    parts = [secret.encode(), secret.split("@", 1)[1].encode(), secret.split()[-1].encode()]
    return [path for path in root.rglob("*") if path.is_file() and any(p in path.read_bytes() for p in parts)]


def test_every_job_ran_as_a_slurm_job_and_failures_have_their_kind(slurm_sweep):
    root, returncode, stdout, _, _, jobs, slurm_job, _ = slurm_sweep
    assert returncode == 1, (root / "stderr.txt").read_text()[-3000:]  # a job failed, as with the grid sweep
    assert sorted(jobs) == ["repeat=0", "repeat=1", "repeat=100000"]
    assert jobs["repeat=1"].info.status == "FINISHED" and jobs["repeat=1"].data.metrics["tokens_per_sec"] > 0
    invalid, timed_out = jobs["repeat=0"], jobs["repeat=100000"]
    assert (invalid.info.status, invalid.data.tags[zi_runs.FAILURE_KIND_TAG]) == ("FAILED", "invalid-config")
    assert (timed_out.info.status, timed_out.data.tags[zi_runs.FAILURE_KIND_TAG]) == ("FAILED", "timeout")
    assert timed_out.data.tags[zi_runs.SLURM_JOB_TAG] == slurm_job
    assert "load_s" in timed_out.data.metrics  # what it measured before its time ran out stays
    assert "Sweep finished: 3 jobs, 2 failed (invalid-config: 1, timeout: 1)" in stdout


def test_a_job_refused_by_its_plan_takes_no_slurm_allocation(slurm_sweep):
    root, _, stdout, _, _, jobs, _, _ = slurm_sweep
    assert "Planned 3 jobs: 1 will be refused, without starting their processes:" in stdout
    assert zi_runs.SLURM_JOB_TAG not in jobs["repeat=0"].data.tags
    assert [run.data.tags.get(zi_runs.SLURM_JOB_TAG) is not None for run in jobs.values()].count(True) == 2
    assert len(submission_scripts(root)) == 2  # one sbatch per job that runs; none for the refused one


def submission_scripts(root: Path) -> dict:
    """{SLURM job id: its sbatch script} of the sweep under ``root``."""
    scripts = (root / "sweep" / ".submitit").rglob("*_submission.sh")
    return {path.name.split("_")[0]: path.read_text() for path in scripts}


def test_each_job_is_sized_by_its_plan_and_named_by_what_it_runs(slurm_sweep, compose):
    from zi_app.config.spec import validate
    from zi_app.plan.job import plan_job

    root, _, _, _, _, jobs, _, _ = slurm_sweep
    scripts = submission_scripts(root)
    for repeat in ("1", "100000"):
        plan = plan_job(validate(compose(f"repeat={repeat}", *QUICK)), False, here=False)
        script = scripts[jobs[f"repeat={repeat}"].data.tags[zi_runs.SLURM_JOB_TAG]]
        assert "#SBATCH --job-name=zi:tiny-opt:b1\n" in script
        assert f"#SBATCH --mem={math.ceil(plan.predicted_peak_host_bytes * 1.25 / 2**30)}GB\n" in script
        assert "#SBATCH --cpus-per-task=1\n" in script and "--gpus-per-node" not in script
        assert "#SBATCH --time=10\n" in script and "#SBATCH --signal=USR2@120\n" in script
        assert "-m hydra_plugins.zero_inference._slurm_job" in script


def test_slurm_says_failed_for_a_failed_job(slurm_sweep, slurm):
    """What ``sacct`` reads: the job's state and exit code (the test cluster keeps them in scontrol instead)."""
    _, _, _, _, _, jobs, _, _ = slurm_sweep
    states = {}
    for repeat in ("1", "100000"):
        shown = slurm.scontrol("show", "job", jobs[f"repeat={repeat}"].data.tags[zi_runs.SLURM_JOB_TAG])
        states[repeat] = re.search(r"JobState=(\w+)", shown).group(1), re.search(r"ExitCode=(\S+)", shown).group(1)
    assert states == {"1": ("COMPLETED", "0:0"), "100000": ("FAILED", "1:0")}


def test_the_parent_run_gets_table_plot_and_best_run(slurm_sweep):
    _, _, _, client, parent, jobs, _, _ = slurm_sweep
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[sweep_end.BEST_RUN_TAG] == jobs["repeat=1"].info.run_id
    assert (parent.data.tags[sweep_end.JOBS_TAG], parent.data.tags[sweep_end.FAILED_JOBS_TAG]) == ("3", "2")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == set(sweep_end.ARTIFACTS.values())
    assert [run.info.run_name for run in jobs.values()].count("repeat=1") == 1  # named by what the sweep varies


def test_the_credentials_in_the_environment_reach_no_file_and_no_output(slurm_sweep):
    root, _, _, _, _, jobs, _, password = slurm_sweep
    assert (root / "sweep" / "multirun.yaml").exists() and list((root / "sweep").rglob("*.pkl"))
    assert files_holding(root, password) == []  # the sweep's folder, submitit's files, stdout and stderr


def test_a_password_in_the_tracking_uri_is_refused_before_anything_is_written(slurm, tracking_server, tmp_path):
    password = f"p@ss {secrets.token_hex(8)}"
    uri = tracking_server.url.replace("http://", f"http://zi:{password.replace(' ', '%20')}@")
    env = {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    for mode in (["-m", "hydra/launcher=zi_slurm", *CPU_NODE, "repeat=1,2"], []):
        refused = subprocess.run([sys.executable, "-m", "zi_app", *mode, f"tracking.uri={uri}",
                                  f"+db.password={password}", "hydra.sweep.dir=sweep", "hydra.run.dir=run"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr
        line, = refused.stderr.splitlines()  # one line, no traceback
        assert line.startswith("error: tracking.uri=http://zi:***@127.0.0.1") and "MLFLOW_TRACKING_PASSWORD" in line
        assert password.split()[-1] not in refused.stdout + refused.stderr and "ss%20" not in line
    assert list(tmp_path.iterdir()) == []  # Hydra wrote nothing: no multirun.yaml, no .hydra/, no pickles
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
