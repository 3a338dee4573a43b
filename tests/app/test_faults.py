"""Faults a hostile but fair user injects: real signals to real job and sweep processes, two sweeps racing on
one new store, broken and unreachable stores, and architecture values that cannot run. Whatever happens,
nothing measured is lost and no run is left RUNNING.

A job is kept running long enough to be signalled by generating many tokens (``gen_len=2000``: tens of
seconds of decode steps on a tiny model); the signal is sent once its run has ``load_s``, i.e. while it
generates, found through the store (no sleeps that guess at timing).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.signals import terminal_signals
from mlflow.tracking import MlflowClient

import zi_app
from hydra_plugins.zero_inference import sweep_callback
from zi_app.record import runs as zi_runs, settle, store as zi_store, sweep_end
from zi_app import ConfigError, validate

QUICK = ["prompt_len=8", "warmup=0", "repeat=1"]
LONG = "2000"  # gen_len of a job that must still be generating when the signal comes
TIMEOUT_S = 600
ENV = {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}


def spawn(root: Path, *args: str) -> subprocess.Popen:
    """``python <args>`` in ``root`` in its own session (process group), as a shell starts a command;
    output to root/out.txt."""
    return subprocess.Popen([sys.executable, *args], cwd=root, env={**ENV, "ZI_CACHE_DIR": str(root / "cache")},
                            start_new_session=True, preexec_fn=terminal_signals,
                            stdout=open(root / "out.txt", "w"), stderr=subprocess.STDOUT)



def output(root: Path) -> str:
    return (root / "out.txt").read_text()


def client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def all_runs(root: Path) -> list:
    store = client(root)
    return store.search_runs([e.experiment_id for e in store.search_experiments()], max_results=1000)


def wait_generating(root: Path, process: subprocess.Popen):
    """The long job's run once it has loaded its model and generates (RUNNING, with ``load_s``). Found
    through the run-id files jobs write: touching the store before the app created it would race it."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for run_file in root.rglob(zi_runs.RUN_ID_FILE):
            run = client(root).get_run(run_file.read_text())
            if run.info.status == "RUNNING" and "load_s" in run.data.metrics and \
                    f"gen_len={LONG}" in run.data.tags.get(zi_runs.OVERRIDES_TAG, ""):
                return run
        time.sleep(0.2)
    pytest.fail(f"no job started generating (exit {process.poll()}):\n{output(root)[-3000:]}")


def wait(process: subprocess.Popen) -> int:
    return process.wait(timeout=TIMEOUT_S)


def assert_nothing_running(root: Path) -> None:
    running = [run.info.run_id for run in all_runs(root) if run.info.status == "RUNNING"]
    assert running == [], running


def sweep_parent(root: Path):
    parents = [run for run in all_runs(root) if run.data.tags.get(zi_runs.ROLE_TAG) == "sweep"]
    assert len(parents) == 1, parents
    return parents[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda signum: signum.name)
def test_a_signalled_job_closes_its_run_and_exits_128_plus_the_signal(tmp_path, signum):
    """kill -TERM (or a closed terminal's SIGHUP) to a single job's process group while it generates."""
    job = spawn(tmp_path, "-m", "zi_app", f"gen_len={LONG}", *QUICK)
    run = wait_generating(tmp_path, job)
    os.killpg(job.pid, signum)
    assert wait(job) == 128 + signum, output(tmp_path)[-3000:]
    name = signal.Signals(signum).name
    assert f"zi_app: stopped by {name}; exit status {128 + signum}" in output(tmp_path)
    run = client(tmp_path).get_run(run.info.run_id)
    tags = run.data.tags
    assert (run.info.status, tags[zi_runs.FAILURE_KIND_TAG], tags[zi_runs.SIGNAL_TAG]) == ("FAILED", "killed", name)
    assert tags[zi_runs.FAILURE_MESSAGE_TAG] == f"Interrupted: stopped by {name}"
    assert "load_s" in run.data.metrics  # what it measured before the signal stays


def test_ctrl_c_marks_the_sweep_interrupted_and_counts_the_jobs_that_never_ran(tmp_path):
    """SIGINT to the sweep's process group (what Ctrl-C sends) while its first of three jobs generates."""
    sweep = spawn(tmp_path, "-m", "zi_app", "-m", f"gen_len={LONG},2,3", *QUICK)
    run = wait_generating(tmp_path, sweep)
    os.killpg(sweep.pid, signal.SIGINT)
    assert wait(sweep) == 128 + signal.SIGINT, output(tmp_path)[-3000:]
    text = output(tmp_path)
    assert "Sweep interrupted by SIGINT: 1 of 3 jobs ran, 2 never ran; 1 failed (killed: 1)" in text
    assert re.search(r"\[1/3\] #0 gen_len=2000: FAILED JobProcessError: the job's process stopped on SIGINT", text)
    job = client(tmp_path).get_run(run.info.run_id)
    assert (job.info.status, job.data.tags[zi_runs.FAILURE_KIND_TAG]) == ("FAILED", "killed")  # not `error`
    assert job.data.tags[zi_runs.SIGNAL_TAG] == "SIGINT"
    parent = sweep_parent(tmp_path)
    tags = parent.data.tags
    assert (parent.info.status, tags[zi_runs.FAILURE_KIND_TAG], tags[zi_runs.SIGNAL_TAG]) == ("FAILED", "killed",
                                                                                                "SIGINT")
    assert tags[sweep_end.NEVER_RAN_TAG] == "2"
    never_ran = client(tmp_path).download_artifacts(parent.info.run_id, sweep_end.NEVER_RAN_ARTIFACT, str(tmp_path))
    assert Path(never_ran).read_text().splitlines() == ["gen_len=2 prompt_len=8 warmup=0 repeat=1",
                                                        "gen_len=3 prompt_len=8 warmup=0 repeat=1"]
    assert_nothing_running(tmp_path)
    assert list(Path(tags[sweep_end.SWEEP_DIR_TAG]).glob(".zi-launcher-*")) == []


def test_sigterm_to_the_sweep_driver_alone_stops_its_job_too(tmp_path):
    """``kill PID`` of the sweep's driver only (the job is not signalled by anyone else): the driver passes
    SIGTERM on to the running job, which closes its run; the driver exits 143."""
    sweep = spawn(tmp_path, "-m", "zi_app", "-m", f"gen_len={LONG},2", *QUICK)
    run = wait_generating(tmp_path, sweep)
    os.kill(sweep.pid, signal.SIGTERM)
    assert wait(sweep) == 128 + signal.SIGTERM, output(tmp_path)[-3000:]
    assert "Sweep interrupted by SIGTERM: 1 of 2 jobs ran, 1 never ran" in output(tmp_path)
    job = client(tmp_path).get_run(run.info.run_id)
    assert (job.info.status, job.data.tags[zi_runs.SIGNAL_TAG]) == ("FAILED", "SIGTERM")
    assert not psutil_alive(int(job.data.tags[zi_runs.PID_TAG]))
    assert sweep_parent(tmp_path).data.tags[zi_runs.SIGNAL_TAG] == "SIGTERM"
    assert_nothing_running(tmp_path)


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_after_sigkill_the_next_command_closes_the_dead_runs_and_says_the_sweep_is_unfinished(tmp_path):
    """SIGKILL to the sweep's process group while its second job generates: nothing can close the runs
    then; ``zi_app.zi_best`` on the store finds the parent and the job RUNNING with their processes gone,
    closes them, says so, and names the sweep unfinished when it ranks the job that completed."""
    sweep = spawn(tmp_path, "-m", "zi_app", "-m", f"gen_len=2,{LONG},3", *QUICK)
    run = wait_generating(tmp_path, sweep)
    os.killpg(sweep.pid, signal.SIGKILL)
    assert wait(sweep) == -signal.SIGKILL
    parent = sweep_parent(tmp_path)
    assert {client(tmp_path).get_run(r).info.status for r in (run.info.run_id, parent.info.run_id)} == {"RUNNING"}
    # The launcher's scratch folder stays in the sweep's folder, not in the system's temp folder.
    assert len(list(Path(parent.data.tags[sweep_end.SWEEP_DIR_TAG]).glob(".zi-launcher-*"))) == 1

    best = subprocess.run([sys.executable, "-m", "zi_app.zi_best"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert best.returncode == 0, best.stderr
    closed = re.search(r"MLflow: closed 2 run\(s\) left RUNNING by a process that is gone \(now FAILED, kind "
                       r"killed\): (\w+), (\w+)", best.stderr)
    assert closed and set(closed.groups()) == {run.info.run_id, parent.info.run_id}, best.stderr
    assert (f"Best run of the latest sweep of experiment 'zero-inference', UNFINISHED sweep {parent.info.run_id} "
            f"(found RUNNING with its process gone") in best.stdout
    assert "(2 runs, 1 failed)" in best.stdout
    for run_id in closed.groups():
        tags = client(tmp_path).get_run(run_id).data.tags
        assert tags[zi_runs.FAILURE_KIND_TAG] == "killed"
    assert_nothing_running(tmp_path)


def test_two_sweeps_started_at_once_on_a_new_store_lose_nothing(tmp_path):
    """Two sweeps started together in one folder on a store that does not exist yet: each creates or finds
    the store and experiment safely (a file lock), gets its own default sweep folder (they start in the
    same second), and records both its jobs under its own parent run."""
    first = subprocess.Popen([sys.executable, "-m", "zi_app", "-m", "gen_len=2,3", *QUICK], cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = subprocess.Popen([sys.executable, "-m", "zi_app", "-m", "gen_len=2,3", "batch=2", *QUICK],
                              cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for text in outputs:
        assert "Sweep finished: 2 jobs, 0 failed" in text and "Callback SweepCallback" not in text
    runs = all_runs(tmp_path)
    parents = [run for run in runs if run.data.tags.get(zi_runs.ROLE_TAG) == "sweep"]
    assert len(parents) == 2 and len({run.info.experiment_id for run in runs}) == 1
    sweep_dirs = {parent.data.tags[sweep_end.SWEEP_DIR_TAG] for parent in parents}
    assert len(sweep_dirs) == 2
    for parent in parents:
        jobs = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [run.info.status for run in jobs] == ["FINISHED", "FINISHED"]
        assert parent.info.status == "FINISHED"


@pytest.mark.quick
def test_the_default_sweep_folder_is_unique_to_the_microsecond(hydra_restore_singletons):
    """Two sweeps started in the same second must not share a folder (nor the run-id files in it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(zi_app.conf_dir()), version_base="1.3"):
        first, second = (str(compose("config", return_hydra_config=True).hydra.sweep.dir) for _ in range(2))
    assert first != second and re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d\.\d{6}", first), (first, second)


@pytest.mark.quick
def test_settling_a_job_touches_only_the_run_it_recorded(tmp_path, compose, monkeypatch):
    """A job folder whose run-id file names another sweep's run (two sweeps sharing a folder): settling this
    sweep's dead job there creates its own FAILED run and leaves the other sweep's run as it was."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment_id = zi_store.open_experiment(uri, "zero-inference")
    store = MlflowClient(uri)
    other_parent = zi_runs.start_sweep_run(experiment_id, "other sweep", {})
    others = store.create_run(experiment_id, tags={"mlflow.parentRunId": other_parent}).info.run_id
    store.set_terminated(others, "FINISHED")
    ours = zi_runs.start_sweep_run(experiment_id, "our sweep", {})
    monkeypatch.setenv(zi_runs.PARENT_RUN_ENV, ours)
    job_dir = tmp_path / "multirun" / "0"
    job_dir.mkdir(parents=True)
    (job_dir / zi_runs.RUN_ID_FILE).write_text(others)
    config = sweep_callback._task_config(compose(f"tracking.uri={uri}"))
    settle.settle_job(job_dir, config, ["batch=1"], RuntimeError("the job's process died"))
    assert store.get_run(others).info.status == "FINISHED" and zi_runs.FAILURE_KIND_TAG not in \
        store.get_run(others).data.tags
    mine = store.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{ours}'")
    assert len(mine) == 1 and mine[0].info.status == "FAILED"
    assert (job_dir / zi_runs.RUN_ID_FILE).read_text() == mine[0].info.run_id


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) but never answers: a hung server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(root: Path, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=root, env={**ENV, "ZI_CACHE_DIR": str(root / "cache")},
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_an_unreachable_tracking_server_is_refused_in_one_line(tmp_path, silent_port):
    """A closed port (refused at once) and a port that never answers (refused after the check's timeout):
    the job, the sweep and the best-run command exit 2 naming the URI (its password masked), in seconds,
    with no traceback."""
    closed, silent = f"http://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{silent_port}"
    # tracking.connect_timeout_s=0: refused at the first failed probe (waiting for a server is tested with a real
    # one, tests/record/test_tracking_server.py)
    commands = [(closed, ["-m", "zi_app", f"tracking.uri={closed}", "tracking.connect_timeout_s=0"]),
                (closed, ["-m", "zi_app", "-m", f"tracking.uri={closed}", "tracking.connect_timeout_s=0", "batch=1,2"]),
                (closed, ["-m", "zi_app.zi_best", "--tracking-uri", closed]),
                (silent, ["-m", "zi_app.zi_best", "--tracking-uri", silent]),
                (closed, ["-m", "zi_app.zi_best", "--tracking-uri", closed.replace("//", "//bob:s3cret@")])]
    for uri, args in commands:
        start = time.monotonic()
        result = run(tmp_path, *args, timeout=120)
        seconds = time.monotonic() - start
        assert result.returncode == 2, (args, result.stdout[-2000:], result.stderr[-3000:])
        [line] = error_lines(result.stderr)
        # The URI as given, or without its credentials (bob:*** or nothing), but never the password.
        shown = rf"http://(bob:\*\*\*@)?{re.escape(uri[len('http://'):])}"
        assert re.search(rf"MLflow tracking server {shown} does not answer within 5 s", line), line
        assert "Traceback" not in result.stderr
        assert "s3cret" not in result.stdout + result.stderr
        assert seconds < 5 + 60, seconds  # the check's timeout plus Python's and Hydra's start on a busy machine
    assert not (tmp_path / "multirun").exists() or not any((tmp_path / "multirun").rglob("mlflow_run_id"))


def test_garbage_in_the_store_is_refused_in_one_line(tmp_path):
    (tmp_path / "mlruns").mkdir()
    db = tmp_path / "mlruns" / "mlflow.db"
    db.write_bytes(b"these are not the tables you are looking for\n" * 100)
    for args in (["-m", "zi_app"], ["-m", "zi_app", "-m", "batch=1,2"], ["-m", "zi_app.zi_best"]):
        result = run(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr[-3000:])
        [line] = error_lines(result.stderr)
        assert str(db) in line and "is not a usable SQLite database (file is not a database)" in line
        assert "Traceback" not in result.stderr and "loading" not in result.stderr


@pytest.fixture
def read_only_store(tmp_path):
    """The store's folder made immutable with ``chattr +i``: as root, permission bits are ignored, but the
    immutable attribute refuses every write, as a read-only mount does."""
    if shutil.which("chattr") is None:
        pytest.fail("chattr (e2fsprogs) is needed to make a folder read-only for root")
    store = tmp_path / "mlruns"
    store.mkdir()
    subprocess.run(["chattr", "+i", str(store)], check=True)
    yield store
    subprocess.run(["chattr", "-i", str(store)], check=True)


def test_a_read_only_store_is_refused_in_one_line(tmp_path, read_only_store):
    for args in (["-m", "zi_app"], ["-m", "zi_app", "-m", "batch=1,2"]):
        result = run(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr[-3000:])
        [line] = error_lines(result.stderr)
        assert f"MLflow store sqlite:///{read_only_store}/mlflow.db: cannot write in {read_only_store} " \
               f"(Operation not permitted)" in line
        assert "Traceback" not in result.stderr


def test_a_failing_end_of_sweep_hook_closes_the_parent_run(tmp_path):
    """The store's artifact folder is a file (as good as a full or broken disk for the artifacts): the job
    fails when it logs its first artifact, then the end-of-sweep hook fails writing the parent's table. The
    sweep says so in a line, exits non-zero, and leaves its parent FAILED, not RUNNING."""
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "artifacts").write_text("not a folder")
    result = run(tmp_path, "-m", "zi_app", "-m", "gen_len=2", *QUICK)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: the end of the sweep failed: " in result.stderr
    parent = sweep_parent(tmp_path)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[zi_runs.FAILURE_MESSAGE_TAG].startswith("the end of the sweep failed:")
    assert_nothing_running(tmp_path)


@pytest.mark.quick
@pytest.mark.parametrize("override, message", [
    ("model.arch.hidden_size=-128", "model.arch.hidden_size=-128 is not allowed: a positive integer"),
    ("model.arch.num_attention_heads=3", "model.arch.num_attention_heads=3 is not allowed: a divisor of "
                                         "hidden_size 128 (the nearest: 2 or 4)"),
    ("model.arch.num_hidden_layers=0", "model.arch.num_hidden_layers=0 is not allowed: a positive integer"),
    ("model.arch.vocab_size=big", "model.arch.vocab_size='big' is not allowed: a positive integer"),
    ("model.arch.ffn_dim=0", "model.arch.ffn_dim=0 is not allowed: a positive integer"),
])
def test_architecture_values_are_validated(compose, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(override))


@pytest.mark.quick
def test_key_value_heads_must_divide_the_attention_heads(compose):
    with pytest.raises(ConfigError, match=re.escape("model.arch.num_key_value_heads=3 is not allowed: a divisor "
                                                    "of num_attention_heads 4")):
        validate(compose("model=tiny-llama", "model.arch.num_key_value_heads=3"))
    for preset in ("tiny-llama", "llama-2-70b", "bloom-176b", "opt-175b"):
        validate(compose(f"model={preset}"))  # the presets pass


def test_a_bad_architecture_value_fails_the_job_as_invalid_config(tmp_path):
    result = run(tmp_path, "-m", "zi_app", "model.arch.num_attention_heads=3", *QUICK)
    assert result.returncode == 2
    assert "error: invalid config: model.arch.num_attention_heads=3 is not allowed" in result.stderr
