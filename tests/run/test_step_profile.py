"""``profile_step=true`` profiles one extra decode step of the real ZeRO-3 engine and logs where its time went.

On CPU only the host side exists (time in ZeRO-3's fetch/release hooks and how many fetches a step
makes); leaf modules must show as fewer fetches than the reference's hook per sub-module. The traced step
is kept as the run's ``profile/decode_step_python.json.gz`` artifact, the events the metrics were read from.
"""

from __future__ import annotations

from conftest import profiled_step_events

COMMON = ("model=tiny-opt", "batch=2", "prompt_len=16", "gen_len=4", "warmup=1", "repeat=1")


def _profiled_job(run_app, mlflow_store, *overrides: str) -> dict:
    run_app(*COMMON, *overrides).expect_success()
    [job] = mlflow_store.job_runs()
    return job.data.metrics


def test_profiled_step_reports_hook_time_and_fetches(run_app, mlflow_store, model_arch):
    reference = _profiled_job(run_app, mlflow_store, "memory=reference", "profile_step=true")
    layers = model_arch("tiny-opt")["num_hidden_layers"]
    # The reference hooks every module that owns parameters: per layer at least q, k, v, out, fc1, fc2, 2 norms.
    assert reference["profile_zero3_fetches"] >= 8 * layers
    assert 0 < reference["profile_zero3_hook_s"] < reference["profile_step_s"]
    assert "tokens_per_sec" in reference and reference["decode_step_s"] > 0
    # The artifact is the trace the metrics were read from: its fetch hooks, counted again, give the same number.
    [job] = mlflow_store.job_runs()
    trace = profiled_step_events(mlflow_store.artifact_path(job, ""))
    hooks = [e for e in trace if e.get("cat") == "python_function"
             and e["name"].endswith("pre_sub_module_forward_function")]
    assert len(hooks) == reference["profile_zero3_fetches"]


def test_leaf_modules_fetch_once_per_layer(run_app, mlflow_store, model_arch):
    tuned = _profiled_job(run_app, mlflow_store, "memory=tuned", "profile_step=true")
    layers = model_arch("tiny-opt")["num_hidden_layers"]
    # One fetch per decoder layer plus the few modules outside the layers (embeddings, final norm, head).
    assert layers <= tuned["profile_zero3_fetches"] < 8 * layers


def test_no_profile_unless_asked(run_app, mlflow_store):
    metrics = _profiled_job(run_app, mlflow_store)
    assert not [key for key in metrics if key.startswith("profile_")]
    [job] = mlflow_store.job_runs()
    assert not mlflow_store.artifact_path(job, "profile").exists()
