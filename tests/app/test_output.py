"""What the terminal shows: a single job ends with its run, its store and the next commands (which work pasted);
a sweep shows one line per job, named by what it varies, then its summary, each job's own output in its folder;
a refused job is one line, with no "Set HYDRA_FULL_ERROR=1" hint of Hydra's; a sweep refused before any job
leaves a FAILED parent run in the store."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import ProcessResult
from mlflow.tracking import MlflowClient

from zi_app.record import runs as zi_runs

JOB = ["prompt_len=8", "gen_len=2", "warmup=0", "repeat=1"]
TIMEOUT_S = 900


def zi(run_python, cwd: Path, *args: str) -> ProcessResult:
    return run_python(["-m", "zi_app", *args], cwd, timeout=TIMEOUT_S)


def test_a_single_job_ends_with_its_run_and_the_next_commands(run_python, tmp_path):
    result = zi(run_python, tmp_path, *JOB)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    run_id = re.search(rf"run (\w+) recorded in {re.escape(uri)}, experiment 'zero-inference'", output).group(1)
    best = re.search(r"next: (.+ --every-sweep) \(the best job of the experiment\)", output).group(1)
    assert re.search(rf"mlflow ui --backend-store-uri {re.escape(uri)} --host 127.0.0.1 \(the MLflow UI\), then "
                     rf"http://127.0.0.1:5000/#/experiments/\d+/runs/{run_id}", output), output[-2000:]
    pasted = subprocess.run(["bash", "-c", best], cwd=tmp_path.parent, capture_output=True, text=True, timeout=300)
    assert pasted.returncode == 0 and run_id in pasted.stdout, pasted.stderr[-2000:]


def test_a_sweep_prints_a_line_per_job_and_a_refused_job_in_one_line(run_python, tmp_path, forked_jobs):
    """Four jobs, two refused by their plan (gen_len=0): one line each, named by the swept keys only; the jobs'
    own progress and result lines are in their folders' output.log; the failure's last word is one line of
    ours, not Hydra's "Error executing job ... Set HYDRA_FULL_ERROR=1"."""
    result = zi(run_python, tmp_path, "-m", "batch=1,2", "gen_len=0,2", "prompt_len=8", "warmup=0", "repeat=1",
                "hydra.sweep.dir=sweep", *forked_jobs())
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    progress = [line for line in lines if re.match(r"\[\d/4\] #\d ", line)]
    assert [line.split(":")[0] for line in progress] == [
        "[1/4] #0 batch=1 gen_len=0", "[2/4] #1 batch=1 gen_len=2", "[3/4] #2 batch=2 gen_len=0",
        "[4/4] #3 batch=2 gen_len=2"], result.stdout
    assert "Every job: prompt_len=8 warmup=0 repeat=1" in result.stdout
    # Nothing of the jobs' own: no result, progress or launch lines; they are in each job's folder.
    assert not [line for line in lines if "result:" in line or "zi_app.run.progress" in line or "Launching" in line]
    assert "result: tiny-opt batch=2" in (tmp_path / "sweep" / "3" / "output.log").read_text()
    assert len([line for line in lines if line.strip()]) < 30, result.stdout
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: job #0 (batch=1 gen_len=0) FAILED ConfigError: gen_len=0 is not allowed")
    assert "HYDRA_FULL_ERROR" not in result.stderr and "Error executing job" not in result.stderr


def test_a_sweep_refused_before_any_job_leaves_a_failed_parent_run(run_python, tmp_path):
    """Refused by our check at the sweep's start (an unknown key) and by Hydra while composing it (a value of
    the wrong type): each leaves one FAILED invalid-config parent run naming the key."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    for args, key in ((["+bacth=8", "batch=1,2"], "bacth"), (["batch=abc", "pin=true,false"], "batch='abc'")):
        result = zi(run_python, tmp_path, "-m", *args)
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"error: invalid config: {key}" in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
        [parent] = client.search_runs([client.get_experiment_by_name("zero-inference").experiment_id],
                                      f"tags.`{zi_runs.OVERRIDES_TAG}` = '{' '.join(args)}'")
        assert parent.info.status == "FAILED" and parent.data.tags[zi_runs.ROLE_TAG] == "sweep"
        assert parent.data.tags[zi_runs.FAILURE_KIND_TAG] == "invalid-config"
        assert key in parent.data.tags[zi_runs.FAILURE_MESSAGE_TAG]
