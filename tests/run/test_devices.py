"""Jobs of several devices on the CPU: real ranks started by torch elastic from the job's process, DeepSpeed's CPU
accelerator (gloo), a real ZeRO-3 engine per rank, and the one MLflow run the job's process keeps.

Two ranks of ``batch=2`` generate for exactly the prompts of one rank of ``batch=4``, so their greedy tokens
must be the same; a rank that dies, or a signal to the job, must end the job with its run closed and no
process left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers.signals import terminal_signals
from mlflow.tracking import MlflowClient

from zi_app.run import ranks as ranks_module
from zi_app.record import runs

SHORT = ["prompt_len=8", "gen_len=4", "warmup=0", "repeat=1"]
LONG = ["prompt_len=8", "gen_len=2000", "warmup=0", "repeat=1"]  # still generating when the test strikes
TIMEOUT_S = 600
# (model, offload, weights): the last reads its weights from a saved checkpoint, so that two ranks also load real
# weights file by file (rank 0 reads the values, every rank takes part in each gather: zi_app/run/checkpoint.py).
CASES = [("tiny-opt", "none", "random"), ("tiny-opt", "cpu", "random"), ("tiny-llama", "none", "random"),
         ("tiny-llama", "cpu", "pretrained")]


def job_run(store, devices: int):
    [run] = [run for run in store.job_runs() if run.data.params["devices"] == str(devices)]
    return run


@pytest.mark.parametrize("model,offload,weights", CASES, ids=[f"{m}-offload={o}-{w}" for m, o, w in CASES])
def test_two_ranks_generate_the_tokens_of_one(model, offload, weights, run_app, mlflow_store, tiny_checkpoint):
    """devices=2 batch=2 against devices=1 batch=4: the same four prompts, the same greedy tokens in the same
    order, and one FINISHED run whose metrics are the whole job's with each rank's beside them."""
    chosen = [f"model={model}"] if weights == "random" else [
        "model=pretrained", f"model.path={tiny_checkpoint(model)}", f"model.name={model}", "model.dtype=float32"]
    run_app(*chosen, f"offload={offload}", "devices=1", "batch=4", *SHORT).expect_success()
    two = run_app(*chosen, f"offload={offload}", "devices=2", "batch=2", *SHORT).expect_success()
    assert f"{model} batch=2 x 2 devices" in two.output

    one_run, two_run = job_run(mlflow_store, 1), job_run(mlflow_store, 2)
    tokens = mlflow_store.artifact_json(two_run, "generation.json")["generated_token_ids"]
    assert len(tokens) == 4 and len({t for row in tokens for t in row}) > 2, f"degenerate output {tokens}"
    assert tokens == mlflow_store.artifact_json(one_run, "generation.json")["generated_token_ids"]

    assert two_run.info.status == "FINISHED" and two_run.data.params["batch"] == "2"
    assert mlflow_store.artifact_json(two_run, "ds_config.json")["train_batch_size"] == 4
    metrics = two_run.data.metrics
    for rank in (0, 1):
        assert {f"tokens_per_sec.rank{rank}", f"load_s.rank{rank}", f"peak_host_rss_bytes.rank{rank}"} <= set(metrics)
    # The job's tokens over the slowest rank's time: 2 ranks x 2 prompts x 4 new tokens.
    assert metrics["latency_s"] == max(metrics["latency_s.rank0"], metrics["latency_s.rank1"])
    # Logged to 4 significant digits (zi_app.record.runs.RATE_DIGITS), as the MLflow UI shows it.
    assert metrics["tokens_per_sec"] == float(f"{16 / metrics['latency_s']:.4g}")
    # The job's process tree: the job's own process and both ranks, more than either rank alone.
    assert metrics["peak_host_rss_bytes"] > max(metrics["peak_host_rss_bytes.rank0"], metrics["peak_host_rss_bytes.rank1"])


def spawn(root: Path, *overrides: str) -> subprocess.Popen:
    """``python -m zi_app <overrides>`` in ``root``, in its own session as a shell starts a command; output to
    root/out.txt."""
    env = {k: v for k, v in os.environ.items() if k not in (runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}
    return subprocess.Popen([sys.executable, "-m", "zi_app", *overrides], cwd=root,
                            env={**env, "ZI_CACHE_DIR": str(root / "cache")}, start_new_session=True,
                            preexec_fn=terminal_signals, stdout=open(root / "out.txt", "w"), stderr=subprocess.STDOUT)


def output(root: Path) -> str:
    return (root / "out.txt").read_text()


def client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def wait_both_ranks_loaded(root: Path, job: subprocess.Popen):
    """The job's run once both ranks have loaded the model (``load_s.rank0`` and ``.rank1`` reached the run)
    and generate; found through the run-id file the job writes."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and job.poll() is None:
        for run_file in root.rglob(runs.RUN_ID_FILE):
            run = client(root).get_run(run_file.read_text())
            if {"load_s.rank0", "load_s.rank1"} <= set(run.data.metrics):
                return run
        time.sleep(0.2)
    pytest.fail(f"the ranks never loaded (exit {job.poll()}):\n{output(root)[-3000:]}")


def rank_processes(job: subprocess.Popen) -> dict:
    """The job's rank processes by rank: each holds its metrics file open while it runs (elastic sets RANK in
    the rank's environment after it started, which /proc does not show)."""
    ranks = {}
    for process in psutil.Process(job.pid).children(recursive=True):
        for rank in (0, 1):
            if any(Path(f.path).name == ranks_module.RANK_FILE.format(rank) for f in process.open_files()):
                ranks[rank] = process
    return ranks


def assert_all_gone(processes) -> None:
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]


def test_a_rank_killed_fails_the_job_and_stops_its_peer(tmp_path):
    """SIGKILL to rank 0 (what the kernel's out-of-memory killer sends) while the ranks generate: elastic stops
    rank 1, the job's run ends FAILED, kind ``killed``, naming the rank and the signal, and keeps what the ranks
    measured; no process of the job is left."""
    job = spawn(tmp_path, "devices=2", "offload=none", *LONG)
    run = wait_both_ranks_loaded(tmp_path, job)
    ranks = rank_processes(job)
    assert sorted(ranks) == [0, 1], ranks
    descendants = psutil.Process(job.pid).children(recursive=True)
    ranks[0].kill()
    assert job.wait(timeout=TIMEOUT_S) == 1, output(tmp_path)[-3000:]
    assert_all_gone(descendants)
    run = client(tmp_path).get_run(run.info.run_id)
    tags = run.data.tags
    assert (run.info.status, tags[runs.FAILURE_KIND_TAG]) == ("FAILED", "killed"), tags
    assert tags[runs.FAILURE_MESSAGE_TAG].startswith("RankFailed: rank 0 failed (killed by SIGKILL)"), tags
    assert {"load_s.rank0", "load_s.rank1", "peak_host_rss_bytes"} <= set(run.data.metrics)


@pytest.mark.parametrize("signum,group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["kill-the-job", "ctrl-c-to-the-group"])
def test_a_signal_to_the_job_stops_every_rank(tmp_path, signum, group):
    """``kill PID`` of the job's process alone (it must stop its ranks itself), or Ctrl-C's SIGINT to the whole
    process group (the ranks get it too), while the ranks generate: both ranks end, the run is closed FAILED
    (kind ``killed``, the signal named) and the job exits 128 + the signal, as a job of one device does, with no
    traceback (Ctrl-C reaches each rank twice: from the terminal and from elastic stopping it)."""
    job = spawn(tmp_path, "devices=2", "offload=none", *LONG)
    run = wait_both_ranks_loaded(tmp_path, job)
    descendants = psutil.Process(job.pid).children(recursive=True)
    assert sorted(rank_processes(job)) == [0, 1]
    (os.killpg if group else os.kill)(job.pid, signum)
    assert job.wait(timeout=TIMEOUT_S) == 128 + signum, output(tmp_path)[-3000:]
    name = signal.Signals(signum).name
    said = output(tmp_path)
    assert f"zi_app: stopped by {name}; exit status {128 + signum}" in said
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said[-3000:]
    assert_all_gone(descendants)
    run = client(tmp_path).get_run(run.info.run_id)
    tags = run.data.tags
    assert (run.info.status, tags[runs.FAILURE_KIND_TAG], tags[runs.SIGNAL_TAG]) == ("FAILED", "killed", name)
    assert "load_s.rank1" in run.data.metrics


def test_the_jobs_metrics_from_its_ranks():
    """CUDA-only metrics too: links add up, streamed bytes are the busiest rank's, the roofline is its bytes
    over one rank's share of the links against the slowest step, peaks are the largest rank's, speed is the job's tokens over the slowest rank's calls."""
    rank0 = {"load_s": 2.0, "peak_gpu_allocated_bytes": 5.0, "h2d_gbps": 50.0, "streamed_bytes_per_step": 1e9,
             "decode_step_s": 0.1, "tokens_per_sec": 1.0, "roofline_ratio": 9.0}
    rank1 = {"load_s": 3.0, "peak_gpu_allocated_bytes": 4.0, "h2d_gbps": 40.0, "streamed_bytes_per_step": 2e9,
             "decode_step_s": 0.2, "tokens_per_sec": 1.0, "roofline_ratio": 9.0}
    calls = [[{"latency_s": 1.0, "prefill_s": 0.5, "decode_step_s": 0.1}],
             [{"latency_s": 2.0, "prefill_s": 0.25, "decode_step_s": 0.2}]]
    repeats = ranks_module.job_repeats(calls, batch=4, prompt_len=8, gen_len=3)
    assert repeats == [{"tokens_per_sec": 6.0, "latency_s": 2.0, "prefill_s": 0.5, "prefill_tokens_per_sec": 64.0,
                        "decode_step_s": 0.2, "decode_tokens_per_sec": 8 / 1.5}]
    job = ranks_module.job_metrics([rank0, rank1], repeats)
    assert (job["load_s"], job["peak_gpu_allocated_bytes"], job["h2d_gbps"], job["streamed_bytes_per_step"]) == (
        3.0, 5.0, 90.0, 2e9)
    assert job["tokens_per_sec"] == 6.0
    assert job["roofline_step_s"] == pytest.approx(2e9 / 45e9)
    assert job["roofline_ratio"] == pytest.approx(0.2 / (2e9 / 45e9))


def test_a_rank_that_ran_out_of_memory_is_an_oom_failure():
    """The kind comes from how the rank ended: a signal is ``killed``, a failed allocation ``oom``."""
    assert ranks_module.RankFailed(1, 1, None, "OutOfMemoryError: CUDA out of memory.").failure_kind == "oom"
    assert ranks_module.RankFailed(1, 1, None, "RuntimeError: shape mismatch").failure_kind == "error"
    killed = ranks_module.RankFailed(0, -9, "SIGKILL", "Signal 9 (SIGKILL) received by PID 7")
    assert (killed.failure_kind, str(killed)) == ("killed", "rank 0 failed (killed by SIGKILL): Signal 9 (SIGKILL) "
                                                            "received by PID 7")
