"""Sweeps of the real app under the default launcher: one fresh process per job, failures recorded as
data, the parent run with its table, plot and best-run tags, the summary, and the best-run command."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
from mlflow.tracking import MlflowClient

from zi_app import zi_best as best_module
from zi_app.record import runs as zi_runs, sweep_end

QUICK = ["prompt_len=16", "warmup=0", "repeat=1"]
SWEEP_TIMEOUT_S = 900


def app_env() -> dict:
    """The environment of a sweep started by a user: no parent or active run inherited from ours."""
    return {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}


def start_sweep(root: Path, *overrides: str, python: Sequence[str] = (sys.executable,)) -> subprocess.Popen:
    """``python -m zi_app -m <overrides>`` in ``root``, output to root/stdout.txt and root/stderr.txt."""
    return subprocess.Popen([*python, "-m", "zi_app", "-m", *overrides, "hydra.sweep.dir=sweep"], cwd=root,
                            env=app_env(), stdout=open(root / "stdout.txt", "w"), stderr=open(root / "stderr.txt", "w"))


def store(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def kill_while_generating(root: Path, job: int, sweep: subprocess.Popen) -> None:
    """SIGKILL job ``job``'s process from outside, as the kernel's OOM killer would, once it has loaded
    its model (its run has ``load_s``) and is generating. The process is found through the run's pid tag."""
    run_file = root / "sweep" / str(job) / "mlflow_run_id"
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while time.monotonic() < deadline and sweep.poll() is None:
        if run_file.exists() and run_file.read_text():
            run = store(root).get_run(run_file.read_text())
            if "load_s" in run.data.metrics:
                os.kill(int(run.data.tags[zi_runs.PID_TAG]), signal.SIGKILL)
                return
        time.sleep(0.1)
    pytest.fail(f"job {job} never started generating; stderr:\n{(root / 'stderr.txt').read_text()[-3000:]}")


def finish(sweep: subprocess.Popen, root: Path) -> tuple:
    sweep.wait(timeout=SWEEP_TIMEOUT_S)
    return sweep.returncode, (root / "stdout.txt").read_text(), (root / "stderr.txt").read_text()


def parent_and_jobs(root: Path) -> tuple:
    client = store(root)
    experiment = client.get_experiment_by_name("zero-inference")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get(zi_runs.ROLE_TAG) == "sweep"]
    assert len(parents) == 1
    jobs = sorted((run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id),
                  key=lambda run: run.info.start_time)
    return parents[0], jobs


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, forked_jobs, forked_python):
    """Four jobs: gen_len=0 fails validation, gen_len=1000 is killed from outside while generating."""
    root = tmp_path_factory.mktemp("failing-sweep")
    sweep = start_sweep(root, "gen_len=4,0,1000,8", *QUICK, *forked_jobs(), python=forked_python())
    kill_while_generating(root, 2, sweep)
    returncode, stdout, stderr = finish(sweep, root)
    parent, jobs = parent_and_jobs(root)
    return root, returncode, stdout, stderr, parent, jobs


def test_the_sweep_goes_on_and_says_how_many_failed(failing_sweep):
    root, returncode, stdout, stderr, parent, jobs = failing_sweep
    assert returncode == 1, stderr[-3000:]
    progress = [line for line in stdout.splitlines() if line.startswith("[") and "] #" in line]
    assert [line.split(":")[0] for line in progress] == [
        "[1/4] #0 gen_len=4", "[2/4] #1 gen_len=0", "[3/4] #2 gen_len=1000", "[4/4] #3 gen_len=8"]
    assert "COMPLETED" in progress[0] and "tokens/s" in progress[0] and "COMPLETED" in progress[3]
    assert "FAILED ConfigError: gen_len=0 is not allowed" in progress[1]
    assert "FAILED JobProcessError" in progress[2] and "SIGKILL" in progress[2]
    assert "Sweep finished: 4 jobs, 2 failed (invalid-config: 1, killed: 1)" in stdout
    assert "2 of 4 jobs failed." in stdout
    assert f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:///{root}/mlruns/mlflow.db " \
           f"--host 127.0.0.1" in stdout
    assert f"runs?viewStateShareKey={parent.info.run_id}&workflowType=machine_learning" in stdout
    assert "Every job: prompt_len=16 warmup=0 repeat=1" in stdout  # said once, not on every job's line


def test_a_failed_job_is_one_line_on_the_terminal(failing_sweep):
    """The invalid job is refused by the sweep's plan before any process starts: one line where the plan is
    printed, one line where the launcher reports it, no traceback anywhere and no job log (no process)."""
    root, _, stdout, stderr, _, _ = failing_sweep
    assert "Traceback" not in stdout + stderr
    assert "Planned 4 jobs: 1 will be refused, without starting their processes:\n  #1 gen_len=0: " \
           "gen_len=0 is not allowed: a positive integer" in stdout
    assert "[2/4] #1 gen_len=0: FAILED ConfigError: gen_len=0 is not allowed: a positive integer" in stdout
    assert list((root / "sweep" / "1").glob("*.log")) == []
    # The first failed job, at the end: our one line, no "Error executing job" or "HYDRA_FULL_ERROR" of Hydra's.
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: job #1 (gen_len=0) FAILED ConfigError: gen_len=0 is not allowed"), stderr[-2000:]
    assert "Error executing job" not in stderr and "HYDRA_FULL_ERROR" not in stderr


def test_printed_hints_work_pasted_in_a_fresh_shell(failing_sweep, tmp_path):
    """The best-run and MLflow UI commands the sweep prints run in a new shell without the venv activated,
    in another directory: they name this environment's interpreter or console scripts and the store."""
    root, _, stdout, _, parent, jobs = failing_sweep
    best_hint = re.search(r"details: (.+)\)$", stdout, re.M).group(1)
    ui_hint = re.search(r"^Browse the runs: (.+)$", stdout, re.M).group(1)
    fresh = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", "bash", "-c"]
    shown = subprocess.run([*fresh, best_hint], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, (best_hint, shown.stderr[-2000:])
    best = max((run for run in jobs if run.info.status == "FINISHED"), key=lambda run: run.data.metrics["tokens_per_sec"])
    assert f"Best run of sweep {parent.info.run_id} (4 runs, 2 failed)" in shown.stdout
    assert best.info.run_id in shown.stdout
    # The UI command would serve until stopped: its own --help proves the tool and subcommand resolve.
    ui = subprocess.run([*fresh, f"{ui_hint} --help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ui.returncode == 0 and "--backend-store-uri" in ui.stdout, (ui_hint, ui.stderr[-2000:])


def test_failures_are_runs_with_their_kind(failing_sweep):
    _, _, _, _, _, jobs = failing_sweep
    assert [run.info.status for run in jobs] == ["FINISHED", "FAILED", "FAILED", "FINISHED"]
    invalid, killed = jobs[1].data.tags, jobs[2].data.tags
    assert invalid[zi_runs.FAILURE_KIND_TAG] == "invalid-config"
    assert "gen_len=0 is not allowed" in invalid[zi_runs.FAILURE_MESSAGE_TAG]
    assert killed[zi_runs.FAILURE_KIND_TAG] == "killed"
    assert "SIGKILL" in killed[zi_runs.FAILURE_MESSAGE_TAG]
    assert "load_s" in jobs[2].data.metrics  # what it measured before it died stays
    for run in (jobs[0], jobs[3]):
        assert run.data.metrics["tokens_per_sec"] > 0 and "peak_host_rss_bytes" in run.data.metrics
    # A new process per job that ran; the invalid one was refused by the sweep's plan, before any process.
    assert zi_runs.PID_TAG not in invalid
    pids = {run.data.tags[zi_runs.PID_TAG] for run in (jobs[0], jobs[2], jobs[3])}
    assert len(pids) == 3


def test_the_parent_run_holds_table_plot_and_best_run(failing_sweep):
    root, _, _, _, parent, jobs = failing_sweep
    best = max((run for run in jobs if run.info.status == "FINISHED"), key=lambda run: run.data.metrics["tokens_per_sec"])
    parent = store(root).get_run(parent.info.run_id)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert tags[sweep_end.BEST_RUN_TAG] == best.info.run_id
    assert tags[sweep_end.BEST_OVERRIDES_TAG] == best.data.tags[zi_runs.OVERRIDES_TAG]
    assert (tags[sweep_end.JOBS_TAG], tags[sweep_end.FAILED_JOBS_TAG]) == ("4", "2")
    assert parent.data.metrics["best_tokens_per_sec"] == best.data.metrics["tokens_per_sec"]
    folder = Path(parent.info.artifact_uri.removeprefix("file://"))
    table = list(csv.DictReader(io.StringIO((folder / "jobs.csv").read_text())))
    assert [row["gen_len"] for row in table] == ["4", "0", "1000", "8"]
    assert [row["failure_kind"] for row in table] == ["", "invalid-config", "killed", ""]
    assert [row["best"] for row in table].count("True") == 1
    markdown = (folder / "jobs.md").read_text()
    assert f"| best | gen_len={best.data.tags[zi_runs.OVERRIDES_TAG].split()[0].split('=')[1]} | FINISHED |" in markdown
    assert markdown.count("| FAILED |") == 2
    assert (folder / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def best_command(monkeypatch, capsys):
    """``best_command(root, *args)``: the best-run command on the store in ``root``, run in this process
    (it only reads MLflow); returns a CompletedProcess."""
    def run(root: Path, *args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(root)
        returncode = best_module.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, out.out, out.err)

    return run


def test_best_run_command_names_the_best_run(failing_sweep, best_command):
    root, _, _, _, parent, jobs = failing_sweep
    finished = [run for run in jobs if run.info.status == "FINISHED"]
    best = max(finished, key=lambda run: run.data.metrics["tokens_per_sec"])
    text = subprocess.run([sys.executable, "-m", "zi_app.zi_best"], cwd=root, env=app_env(), capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert (f"Best run of the latest sweep of experiment 'zero-inference', sweep {parent.info.run_id} "
            f"(4 runs, 2 failed)") in text.stdout
    assert best.info.run_id in text.stdout and best.data.tags[zi_runs.OVERRIDES_TAG] in text.stdout
    info = json.loads(best_command(root, "--json").stdout)
    assert info["run_id"] == best.info.run_id
    assert info["tokens_per_sec"] == best.data.metrics["tokens_per_sec"]
    assert info["peak_host_gib"] == best.data.metrics["peak_host_rss_bytes"] / 2**30
    assert info["peak_gpu_allocated_gib"] is None  # a CPU run
    assert json.loads(Path(info["ds_config"]).read_text())["zero_optimization"]["stage"] == 3
    fastest = min(finished, key=lambda run: run.data.metrics["latency_s"])
    by_latency = json.loads(best_command(root, "--json", "--metric", "latency_s", "--minimize").stdout)
    assert by_latency["run_id"] == fastest.info.run_id
    assert json.loads(best_command(root, "--json", "--experiment", "zero-inference").stdout)["run_id"] == best.info.run_id


def test_best_run_command_respects_a_memory_cap(failing_sweep, best_command):
    root, _, _, _, parent, jobs = failing_sweep
    peaks = sorted(run.data.metrics["peak_host_rss_bytes"] / 2**30 for run in jobs if run.info.status == "FINISHED")
    capped = best_command(root, "--parent", parent.info.run_id, "--max-peak-host-gib", f"{peaks[0] / 2:.4f}")
    assert capped.returncode == 1
    assert "no completed run with metric tokens_per_sec with peak host RSS <=" in capped.stderr
    gpu_capped = best_command(root, "--max-peak-gpu-gib", "80")
    assert gpu_capped.returncode == 1  # CPU runs have no GPU peak: none is known to fit a GPU cap
    unknown = best_command(root, "--parent", "0123456789abcdef")
    assert unknown.returncode == 2 and "--parent '0123456789abcdef': no such run" in unknown.stderr


def test_peak_memory_is_measured_per_job(tmp_path):
    """A job with a 4096-wide model first, then the tiny one: the tiny job's peak is its own."""
    sweep = start_sweep(tmp_path, "model.arch.hidden_size=4096,128", "gen_len=4", *QUICK)
    returncode, stdout, stderr = finish(sweep, tmp_path)
    assert returncode == 0, stderr[-3000:]
    _, (large, tiny) = parent_and_jobs(tmp_path)
    large_peak, tiny_peak = (run.data.metrics["peak_host_rss_bytes"] for run in (large, tiny))
    assert large_peak - tiny_peak > 0.25 * 2**30, (large_peak, tiny_peak)  # measured: 1.19 vs 0.57 GiB


def test_failures_and_parent_run_under_submitit_local(tmp_path):
    """The same bookkeeping under Hydra's submitit_local launcher, which starts every job at once in
    its own process and knows nothing of ours: the callbacks record the failures and close the sweep."""
    sweep = start_sweep(tmp_path, "hydra/launcher=submitit_local", "gen_len=0,4,1000", *QUICK)
    kill_while_generating(tmp_path, 2, sweep)
    returncode, stdout, stderr = finish(sweep, tmp_path)
    assert returncode == 1, stderr[-3000:]
    parent, jobs = parent_and_jobs(tmp_path)
    runs = {run.data.tags[zi_runs.OVERRIDES_TAG].split()[0]: run for run in jobs}
    assert sorted(runs) == ["gen_len=0", "gen_len=1000", "gen_len=4"]
    assert runs["gen_len=4"].info.status == "FINISHED"
    assert runs["gen_len=0"].data.tags[zi_runs.FAILURE_KIND_TAG] == "invalid-config"
    killed = runs["gen_len=1000"]
    assert (killed.info.status, killed.data.tags[zi_runs.FAILURE_KIND_TAG]) == ("FAILED", "killed")
    assert "its process ended while the sweep ran" in killed.data.tags[zi_runs.FAILURE_MESSAGE_TAG]
    assert len({run.data.tags[zi_runs.PID_TAG] for run in jobs}) == 3
    parent = store(tmp_path).get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[sweep_end.BEST_RUN_TAG] == runs["gen_len=4"].info.run_id
    assert {a.path for a in store(tmp_path).list_artifacts(parent.info.run_id)} == set(sweep_end.ARTIFACTS.values())
    assert "Sweep finished: 3 jobs, 2 failed (invalid-config: 1, killed: 1)" in stdout


def test_a_sweep_that_stops_before_its_jobs_leaves_a_failed_parent(tmp_path):
    run = subprocess.run([sys.executable, "-m", "zi_app", "-m", "batch=abc,1"], cwd=tmp_path, env=app_env(),
                         capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    assert run.returncode == 2
    assert "error: invalid config: batch='abc' is not allowed" in run.stderr
    parent = re.search(r"Sweep ended before any job ran; its parent run (\w+) is marked FAILED", run.stdout).group(1)
    assert store(tmp_path).get_run(parent).info.status == "FAILED"


def test_a_dry_run_sweep_touches_no_store(tmp_path):
    run = subprocess.run([sys.executable, "-m", "zi_app", "-m", "dry_run=true", "batch=1,2"], cwd=tmp_path,
                         env=app_env(), capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"train_batch_size"') == 2 and "[2/2] #1 dry_run=True batch=2: COMPLETED" in run.stdout
    assert not (tmp_path / "mlruns").exists()
