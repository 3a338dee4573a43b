"""``profile_step=true`` profiles one extra decode step of the real ZeRO-3 engine and logs where its time went.

On CPU only the host side exists (time in ZeRO-3's fetch/release hooks and how many fetches a step
makes); leaf modules must show as fewer fetches than the reference's hook per sub-module.
"""

from __future__ import annotations

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


def test_leaf_modules_fetch_once_per_layer(run_app, mlflow_store, model_arch):
    tuned = _profiled_job(run_app, mlflow_store, "memory=tuned", "profile_step=true")
    layers = model_arch("tiny-opt")["num_hidden_layers"]
    # One fetch per decoder layer plus the few modules outside the layers (embeddings, final norm, head).
    assert layers <= tuned["profile_zero3_fetches"] < 8 * layers


def test_no_profile_unless_asked(run_app, mlflow_store):
    metrics = _profiled_job(run_app, mlflow_store)
    assert not [key for key in metrics if key.startswith("profile_")]
