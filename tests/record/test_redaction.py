"""Secrets masked in what the app stores and prints, server credentials moved to MLflow's own variables, and
job runs named by what their sweep varies (pure functions; the end-to-end checks are in test_tracking_server)."""

from __future__ import annotations

import os

import pytest

from zi_app.record import runs, store
from zi_app.record.redaction import (SecretError, find_secrets, public_url, redact, redact_overrides, redact_text,
                                     refuse_secrets, scrub_files)

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
    assert redact_overrides(["batch=8", r"tracking.uri=http\://alice\:pw@host\:5000", "+db.token=abc"]) == \
        r"batch=8 tracking.uri=http\://alice\:***@host\:5000 +db.token=***"
    assert public_url("http://alice:pw@host:5000/x") == "http://host:5000/x"


def test_a_password_holding_an_at_sign_or_a_space_is_masked_whole():
    assert redact_text("http://user:p@ssAT3@host:5000/x") == "http://user:***@host:5000/x"
    # As Hydra escapes them in a job's overrides: ':' and ' ' behind a backslash, '@' as it is
    assert redact_overrides([r"tracking.uri=http\://user\:p@ss\ AT3@host\:5000"]) == \
        r"tracking.uri=http\://user\:***@host\:5000"
    # A secret-named value is masked whole, the part after a space included (overrides come as a list)
    assert redact_overrides(["+db.password=two words", "batch=1"]) == "+db.password=*** batch=1"
    assert redact({"db": {"token": "two words"}}) == {"db": {"token": "***"}}


def test_secrets_in_a_config_or_its_overrides_are_found_and_refused(tmp_path):
    config = {"tracking": {"uri": "http://alice:p@ss@host:5000"}, "db": {"token": "t k"}, "batch": 1}
    sweep = [r"tracking.uri=http\://bob\:q1@h,http\://bob\:q2@h", "batch=1,2"]
    assert [secret for _, secret in find_secrets(config, sweep)] == ["q1", "q2", "p@ss", "t k"]
    assert find_secrets({"tracking": {"uri": "http://alice@host:5000"}}, ["batch=1"]) == []
    with pytest.raises(SecretError) as refused:
        refuse_secrets(config, ["batch=1"])
    message = str(refused.value)
    assert message.startswith("tracking.uri=http://alice:***@host:5000: ") and "p@ss" not in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- tracking.uri=http\\://a\\:p@ss@h\n")
    scrub_files(tmp_path, ["p@ss"])
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == "- tracking.uri=http\\://a\\:***@h\n"


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
