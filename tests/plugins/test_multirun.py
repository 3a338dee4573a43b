"""A Hydra multirun of 4 jobs gives 4 finished MLflow runs, each with its own settings and metrics."""

from __future__ import annotations

METRICS = ("tokens_per_sec", "latency_s", "prefill_s", "prefill_tokens_per_sec", "decode_step_s",
           "decode_tokens_per_sec", "load_s", "peak_host_rss_bytes")


def test_four_jobs_give_four_runs_with_metrics(run_app, mlflow_store):
    """``-m batch=1,2 pin=true,false``: one run per job (the sweep's parent run is no job and is not
    counted), all FINISHED, covering the 4 combinations, each with every metric and batch x gen_len tokens."""
    run = run_app("batch=1,2", "pin=true,false", "prompt_len=16", "gen_len=4", "warmup=0", "repeat=1",
                  multirun=True).expect_success()
    # DeepSpeed's compiler probes and op-load prints stay out of a job's output unless asked (verbose=true).
    assert "-laio" not in run.output and "built successfully" not in run.output, run.tail()
    jobs = mlflow_store.job_runs()
    assert len(jobs) == 4, [job.info.run_name for job in jobs]
    assert {job.info.status for job in jobs} == {"FINISHED"}
    assert {(job.data.params["batch"], job.data.params["pin"]) for job in jobs} == {
        ("1", "True"), ("1", "False"), ("2", "True"), ("2", "False")}
    for job in jobs:
        assert all(job.data.metrics.get(name, 0) > 0 for name in METRICS), job.data.metrics
        tokens = mlflow_store.artifact_json(job, "generation.json")["generated_token_ids"]
        assert [len(row) for row in tokens] == [4] * int(job.data.params["batch"])


def test_verbose_shows_deepspeeds_own_output(run_app, mlflow_store):
    """verbose=true: DeepSpeed's compiler probes (``gcc ... -laio``) and the load of its shm_comm op (the CPU
    accelerator's collectives, loaded by every job on this CPU machine) show; verbose is no MLflow param."""
    run = run_app("verbose=true", "prompt_len=16", "gen_len=2", "warmup=0", "repeat=1").expect_success()
    assert "-laio" in run.output and "deepspeed_shm_comm_op built successfully" in run.output, run.tail()
    (job,) = mlflow_store.job_runs()
    assert "verbose" not in job.data.params and job.data.params["batch"] == "1"
