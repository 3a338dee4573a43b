"""Secrets masked in what the app stores and prints, server credentials moved to MLflow's own variables, and
job runs named by what their sweep varies (pure functions; the end-to-end checks are in test_tracking_server)."""

from __future__ import annotations

import os

import pytest

from zi_app.record import runs, store
from zi_app.record.redaction import public_url, redact, redact_overrides, redact_text

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)


def test_passwords_in_urls_and_secret_keys_are_masked():
    assert redact_text("at postgresql+psycopg2://zi:s3cr3t@db:5432/mlflow now") == \
        "at postgresql+psycopg2://zi:***@db:5432/mlflow now"
    assert redact_text("http://127.0.0.1:5000 and s3://bucket/key") == "http://127.0.0.1:5000 and s3://bucket/key"
    config = {"tracking": {"uri": "https://alice:pw@mlflow.example"}, "db": {"password": "pw", "api_key": None},
              "batch": 8, "hosts": ["http://u:pw@a"]}
    assert redact(config) == {"tracking": {"uri": "https://alice:***@mlflow.example"},
                              "db": {"password": "***", "api_key": None}, "batch": 8, "hosts": ["http://u:***@a"]}
    # Hydra escapes ':' in the overrides it hands a job
    assert redact_overrides(r"batch=8 tracking.uri=http\://alice\:pw@host\:5000 +db.token=abc") == \
        r"batch=8 tracking.uri=http\://alice\:***@host\:5000 +db.token=***"
    assert public_url("http://alice:pw@host:5000/x") == "http://host:5000/x"


def test_server_credentials_move_to_mlflow_environment_variables(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert store.absolute_uri("http://alice:p%40ss@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p@ss")


@pytest.mark.parametrize("swept, overrides, name", [
    ("batch,pin", "batch=64 pin=True prompt_len=16", "batch=64 pin=true"),
    ("", "batch=64 prompt_len=16", "batch=64 prompt_len=16"),
    ("model", "+model=opt-13b batch=1", "model=opt-13b"),
    ("batch", "", "job"),
])
def test_job_runs_are_named_by_what_their_sweep_varies(monkeypatch, swept, overrides, name):
    monkeypatch.setenv(runs.SWEPT_KEYS_ENV, swept)
    assert runs.run_name(overrides) == name


def test_params_never_hold_a_secret():
    params = runs.job_params({"batch": 1, "model": {"path": "https://u:pw@hub/x"}, "tracking": {"uri": "x"}})
    assert params == {"batch": 1, "model.path": "https://u:***@hub/x"}


def test_a_submitit_time_limit_notice_is_a_timeout():
    from submitit.core.utils import UncompletedJobError

    assert runs.failure_kind(UncompletedJobError("Job not requeued because: timed-out too many times.")) == \
        "timeout"
    assert runs.failure_kind(UncompletedJobError("Job 12 has not produced any output")) == "error"
