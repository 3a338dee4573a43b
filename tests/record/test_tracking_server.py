"""A shared tracking server: sweeps, the best-run command and artifacts against a real ``mlflow server`` on a
real PostgreSQL (started by the session fixtures in helpers/services.py), credentials in MLflow's environment
variables that reach nothing the app writes or prints, and two sweeps racing on one server and on one SQLite file."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
from mlflow.tracking import MlflowClient

from zi_app.record import runs as zi_runs, sweep_end

QUICK = ["prompt_len=8", "gen_len=2", "warmup=0", "repeat=1"]
TIMEOUT_S = 900


def app_env() -> dict:
    """A user's environment: no run of ours to nest under, no tracking credentials."""
    drop = (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return {k: v for k, v in os.environ.items() if k not in drop}


def start_sweep(root: Path, name: str, *overrides: str, python: Sequence[str] = (sys.executable,)) -> subprocess.Popen:
    """``python -m zi_app -m <overrides>`` in ``root``; output to root/<name>.out and root/<name>.err."""
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*python, "-m", "zi_app", "-m", *overrides, *QUICK], cwd=root, env=app_env(),
                            stdout=open(root / f"{name}.out", "w"), stderr=open(root / f"{name}.err", "w"))


def finish(process: subprocess.Popen, root: Path, name: str) -> str:
    """Wait for a sweep; assert it succeeded and return its stdout."""
    process.wait(timeout=TIMEOUT_S)
    assert process.returncode == 0, (root / f"{name}.err").read_text()[-3000:]
    return (root / f"{name}.out").read_text()


def sweep_runs(client: MlflowClient, experiment: str) -> tuple:
    """The parents of the experiment's sweeps and, per parent id, its job runs in start order."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get(zi_runs.ROLE_TAG) == "sweep"]
    children = {p.info.run_id: sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id),
                                      key=lambda r: r.info.start_time) for p in parents}
    assert len(runs) == len(parents) + sum(map(len, children.values())), "runs outside any sweep"
    return parents, children


@pytest.fixture(scope="module")
def server_sweep(tracking_server, tmp_path_factory, forked_jobs, forked_python):
    """A two-job sweep logging to the server with credentials in MLflow's environment variables (a password in
    the URI is refused: test_cluster), then the best-run command."""
    root = tmp_path_factory.mktemp("server-sweep")
    password = secrets.token_hex(10)
    env = {**app_env(), "MLFLOW_TRACKING_USERNAME": "zi", "MLFLOW_TRACKING_PASSWORD": password}
    run = subprocess.run([*forked_python(), "-m", "zi_app", "-m", "batch=1,2", "pin=true", *QUICK,
                          f"tracking.uri={tracking_server.url}", "tracking.experiment=server-sweep", *forked_jobs()],
                         cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    client = MlflowClient(tracking_server.url)
    # A later sweep of someone else on the shared server: zi-best without --parent picks this user's latest
    someone_else = client.create_run(client.get_experiment_by_name("server-sweep").experiment_id, tags={
        zi_runs.ROLE_TAG: "sweep", "mlflow.user": "someone-else"}).info.run_id
    best = subprocess.run([*forked_python(), "-m", "zi_app.zi_best", "--tracking-uri", tracking_server.url, "--json",
                           "--experiment", "server-sweep"], cwd=root, env=app_env(), capture_output=True, text=True,
                          timeout=120)
    client.delete_run(someone_else)
    assert best.returncode == 0, best.stderr
    parents, children = sweep_runs(MlflowClient(tracking_server.url), "server-sweep")
    assert len(parents) == 1
    return root, password, run, best, parents[0], children[parents[0].info.run_id]


def test_a_sweep_logs_runs_and_artifacts_to_the_server(server_sweep, tracking_server, tmp_path):
    _, _, run, _, parent, jobs = server_sweep
    client = MlflowClient(tracking_server.url)
    assert [job.info.status for job in jobs] == ["FINISHED", "FINISHED"]
    assert [job.info.run_name for job in jobs] == ["batch=1", "batch=2"]  # what varies; the rest is in the tag
    assert jobs[0].data.tags[zi_runs.OVERRIDES_TAG].startswith("batch=1 pin=True " + " ".join(QUICK))
    for job in jobs:
        assert job.data.metrics["tokens_per_sec"] > 0
        assert job.info.artifact_uri.startswith("mlflow-artifacts:/")  # served by the server, not a local path
        assert {a.path for a in client.list_artifacts(job.info.run_id)} == {"ds_config.json", "config.yaml",
                                                                             "generation.json"}
        stored = list(tracking_server.artifacts.rglob(f"{job.info.run_id}/artifacts/ds_config.json"))
        assert len(stored) == 1 and json.loads(stored[0].read_text())["zero_optimization"]["stage"] == 3
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == set(sweep_end.ARTIFACTS.values())
    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent.info.run_id, "jobs.csv",
                                                                           str(tmp_path))).read_text())))
    assert sorted(row["run_id"] for row in table) == sorted(job.info.run_id for job in jobs)
    best = max(jobs, key=lambda job: job.data.metrics["tokens_per_sec"])
    assert parent.data.tags[sweep_end.BEST_RUN_TAG] == best.info.run_id
    assert f"This sweep's runs, best first: {tracking_server.url}/#/experiments/{parent.info.experiment_id}/" \
           in run.stdout


def test_the_best_run_command_reads_the_server(server_sweep):
    _, _, _, best, parent, jobs = server_sweep
    info = json.loads(best.stdout)
    top = max(jobs, key=lambda job: job.data.metrics["tokens_per_sec"])
    # This user's latest sweep of the experiment, though someone else's started later; it says which it picked
    assert info["ranked"] == f"the latest sweep of experiment 'server-sweep' by {getpass.getuser()}, " \
                             f"sweep {parent.info.run_id}"
    assert info["run_id"] == top.info.run_id and info["tokens_per_sec"] == top.data.metrics["tokens_per_sec"]
    assert info["ds_config"] == f"{top.info.artifact_uri}/ds_config.json"


def test_the_password_reaches_no_param_tag_artifact_or_output(server_sweep, tracking_server, postgres):
    root, password, run, best, parent, jobs = server_sweep
    client = MlflowClient(tracking_server.url)
    experiment = client.get_experiment(parent.info.experiment_id)
    for stored in [parent, *jobs]:
        run_data = client.get_run(stored.info.run_id)
        written = [run_data.info.run_name, *run_data.data.params.values(), *run_data.data.tags.values()]
        assert not [value for value in written if password in value], stored.info.run_id
    assert not [value for value in experiment.tags.values() if password in value]
    config = [path for path in tracking_server.artifacts.rglob("config.yaml") if jobs[0].info.run_id in str(path)]
    assert f"uri: {tracking_server.url}" in config[0].read_text()
    leaks = [path for path in tracking_server.artifacts.rglob("*") if path.is_file() and
             password.encode() in path.read_bytes()]
    assert not leaks
    assert password not in postgres.dump(tracking_server.database)  # every param, tag and name the server stored
    for output in (run.stdout, run.stderr, best.stdout, best.stderr):
        assert password not in output
    assert not [path for path in root.rglob("*") if path.is_file() and password.encode() in path.read_bytes()]


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_two_sweeps_started_at_once_lose_nothing(store, tracking_server, tmp_path, forked_jobs, forked_python):
    """Two sweeps started together on one new experiment, against one server (each from its own folder) or one
    SQLite file (both from the same folder, as two people at one machine would): every run is there."""
    experiment = f"race-{store}"
    if store == "server":
        roots, uri = [tmp_path / "a", tmp_path / "b"], tracking_server.url
    else:
        roots, uri = [tmp_path, tmp_path], f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    common = [f"tracking.uri={uri}", f"tracking.experiment={experiment}", *forked_jobs()]
    sweeps = [start_sweep(roots[0], "first", "batch=1,2", *common, python=forked_python()),
              start_sweep(roots[1], "second", "batch=3,4", *common, python=forked_python())]
    outputs = [finish(sweeps[0], roots[0], "first"), finish(sweeps[1], roots[1], "second")]
    client = MlflowClient(uri)
    parents, children = sweep_runs(client, experiment)
    assert len(parents) == 2
    assert client.search_runs(["0"]) == []  # nothing went to the Default experiment
    by_batches = {}
    for parent in parents:
        jobs = children[parent.info.run_id]
        by_batches[tuple(job.info.run_name for job in jobs)] = parent
        assert [job.info.status for job in jobs] == ["FINISHED", "FINISHED"]
        for job in jobs:
            assert job.data.metrics["tokens_per_sec"] > 0
            assert {a.path for a in client.list_artifacts(job.info.run_id)} >= {"ds_config.json", "config.yaml"}
        finished = client.get_run(parent.info.run_id)
        assert finished.info.status == "FINISHED" and finished.data.tags[sweep_end.JOBS_TAG] == "2"
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} == set(sweep_end.ARTIFACTS.values())
        assert any(f"sweep parent run {parent.info.run_id}" in out for out in outputs)
    assert sorted(by_batches) == [("batch=1", "batch=2"), ("batch=3", "batch=4")]


def test_a_job_starting_while_the_server_is_away_waits_for_it(tracking_server, tmp_path):
    """The server stopped (SIGSTOP: it accepts connections and answers nothing) while a job starts: the job says
    that it waits, and runs and records its run once the server is back, 12 s later. With a shorter
    tracking.connect_timeout_s the job fails in one line, naming the key."""
    common = [*QUICK, f"tracking.uri={tracking_server.url}", "tracking.experiment=blip"]
    os.killpg(tracking_server.process_group, signal.SIGSTOP)
    try:
        job = subprocess.Popen([sys.executable, "-m", "zi_app", *common, "tracking.connect_timeout_s=90"],
                               cwd=tmp_path, env=app_env(), stdout=open(tmp_path / "job.out", "w"),
                               stderr=open(tmp_path / "job.err", "w"))
        time.sleep(12)
        short = subprocess.run([sys.executable, "-m", "zi_app", *common, "tracking.connect_timeout_s=3"],
                               cwd=tmp_path, env=app_env(), capture_output=True, text=True, timeout=120)
    finally:
        os.killpg(tracking_server.process_group, signal.SIGCONT)
    job.wait(timeout=TIMEOUT_S)
    err = (tmp_path / "job.err").read_text()
    assert job.returncode == 0, err[-3000:]
    assert f"MLflow tracking server {tracking_server.url} does not answer (" in err and "retrying for up to" in err
    assert f"MLflow tracking server {tracking_server.url} answers again" in err
    client = MlflowClient(tracking_server.url)
    recorded = client.search_runs([client.get_experiment_by_name("blip").experiment_id])
    assert [run.info.status for run in recorded] == ["FINISHED"]
    assert recorded[0].data.metrics["tokens_per_sec"] > 0
    assert short.returncode == 2, short.stderr
    assert short.stderr.splitlines()[-1].startswith(f"error: MLflow tracking server {tracking_server.url} does not "
                                                     f"answer for 3 s (tracking.connect_timeout_s=3")
    assert "Traceback" not in short.stderr


def test_a_job_that_could_not_be_recorded_is_listed_and_recorded_at_the_sweeps_end(tracking_server, tmp_path):
    """The server stopped (SIGSTOP) once the sweep's parent run exists, so that its first job fails without a
    run and cannot be recorded by its own process either (tracking.connect_timeout_s=3); the server continues
    before the second job. The end of the sweep records the first job FAILED with the reason, the summary lists
    it, and the parent run counts it: not a sweep that finished with everything fine."""
    common = [f"tracking.uri={tracking_server.url}", "tracking.experiment=unrecorded", "tracking.connect_timeout_s=3",
              "hydra.sweep.dir=sweep"]
    sweep = start_sweep(tmp_path, "sweep", "batch=1,2", *common)
    note = tmp_path / "sweep" / "0" / "mlflow_unrecorded"
    deadline = time.monotonic() + TIMEOUT_S
    stopped = False
    try:
        while time.monotonic() < deadline and sweep.poll() is None:
            if not stopped and "MLflow: sweep parent run" in (tmp_path / "sweep.out").read_text():
                os.killpg(tracking_server.process_group, signal.SIGSTOP)  # the driver needs it no more until the end
                stopped = True
            if note.exists():
                break
            time.sleep(0.1)
    finally:
        os.killpg(tracking_server.process_group, signal.SIGCONT)
    sweep.wait(timeout=TIMEOUT_S)
    out, err = (tmp_path / "sweep.out").read_text(), (tmp_path / "sweep.err").read_text()
    assert note.exists() and sweep.returncode == 1, err[-3000:]
    # Said in the job's own output, which a sweep keeps in the job's folder (verbose=true shows it too).
    job_output = (tmp_path / "sweep" / "0" / "output.log").read_text()
    assert "warning: job 0 failed and could not be recorded now (the sweep's end tries again)" in job_output
    assert "Sweep finished: 2 jobs, 1 failed (error: 1)" in out
    assert "Not recorded while they ran (the store did not take them: a tracking server away, a full disk): " \
           "batch=1 (recorded FAILED at the " \
           "sweep's end)\n" in out
    client = MlflowClient(tracking_server.url)
    parents, children = sweep_runs(client, "unrecorded")
    parent = client.get_run(parents[0].info.run_id)
    jobs = {run.data.tags[zi_runs.OVERRIDES_TAG].split()[0]: run for run in children[parent.info.run_id]}
    first, second = jobs["batch=1"], jobs["batch=2"]  # the first recorded last, at the sweep's end
    assert second.info.status == "FINISHED"
    assert (first.info.status, first.data.tags[zi_runs.FAILURE_KIND_TAG]) == ("FAILED", "error")
    assert first.data.tags["zi.recorded_late"] == "true"
    assert "its run could not be recorded while it ran" in first.data.tags[zi_runs.FAILURE_MESSAGE_TAG]
    tags = parent.data.tags
    assert (tags[sweep_end.UNRECORDED_TAG], tags[sweep_end.FAILED_JOBS_TAG]) == ("1", "1")
    listed = client.download_artifacts(parent.info.run_id, sweep_end.UNRECORDED_ARTIFACT, str(tmp_path))
    assert Path(listed).read_text().startswith("recorded late: batch=1 ")
