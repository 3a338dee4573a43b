"""A tracking server that checks credentials: MLflow's basic-auth app on PostgreSQL (session fixture in
helpers/services.py, started as docs/cluster.md says). A sweep with the right password in MLflow's variables runs and
its printed best-run command works when pasted; a wrong password is refused in one line (exit 2, no traceback) by
the sweep and by zi-best; a user with MLflow's default READ permission is refused in one line until an admin gives
it EDIT permission on the experiment, as the docs show; the docs' ``--allowed-hosts`` serves clients that use the
machine's address."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from zi_app.record import runs as zi_runs

QUICK = ["prompt_len=8", "gen_len=2", "warmup=0", "repeat=1"]
TIMEOUT_S = 600
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def user_env(server, name: str, password=None) -> dict:
    """A user's environment: no run of ours to nest under, the user's credentials in MLflow's variables."""
    drop = (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID", *CREDENTIALS)
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **server.as_user(name, password)}


def zi(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` in ``root`` with ``env``, to its end."""
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_refused(result: subprocess.CompletedProcess, start: str, password: str) -> None:
    """Exit 2, one line on stderr starting with ``start``, no traceback, and the password nowhere."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line, = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(start), line
    assert "Traceback" not in result.stderr and password not in result.stdout + result.stderr


def test_a_sweep_with_the_right_password_runs_and_its_best_run_command_works(auth_server, tmp_path, forked_jobs):
    env = user_env(auth_server, "alice")
    sweep = zi(tmp_path, env, "zi_app", "-m", "batch=1", *QUICK, f"tracking.uri={auth_server.url}",
               "tracking.experiment=auth", *forked_jobs())
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "Sweep finished: 1 jobs, 0 failed" in sweep.stdout
    best = re.search(r"\(run \w+; details: (.+)\)$", sweep.stdout, re.M)
    assert best, sweep.stdout[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = subprocess.run(best.group(1), shell=True, cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert pasted.returncode == 0 and "Traceback" not in pasted.stderr, pasted.stderr[-3000:]
    assert "Best run of sweep" in pasted.stdout
    assert auth_server.passwords["alice"] not in sweep.stdout + sweep.stderr + pasted.stdout + pasted.stderr


def test_a_wrong_password_is_refused_in_one_line(auth_server, tmp_path):
    env = user_env(auth_server, "alice", "not-the-password")
    refusal = f"error: MLflow tracking server {auth_server.url} refused user 'alice': wrong password (401"
    sweep = zi(tmp_path, env, "zi_app", "-m", "batch=1,2", *QUICK, f"tracking.uri={auth_server.url}",
               "tracking.experiment=auth-wrong", "hydra.sweep.dir=sweep")
    assert_refused(sweep, refusal, "not-the-password")
    assert "MLFLOW_TRACKING_PASSWORD" in sweep.stderr
    best = zi(tmp_path, env, "zi_app.zi_best", "--tracking-uri", auth_server.url)
    assert_refused(best, refusal, "not-the-password")


def test_a_user_with_read_permission_writes_once_given_edit_permission(auth_server, tmp_path, monkeypatch):
    for name, value in auth_server.as_user("alice").items():
        monkeypatch.setenv(name, value)
    experiment = MlflowClient(auth_server.url).create_experiment("alice-shares")  # alice owns it
    bob = user_env(auth_server, "bob")
    common = [*QUICK, f"tracking.uri={auth_server.url}", "tracking.experiment=alice-shares"]
    refused = zi(tmp_path, bob, "zi_app", "-m", "batch=1,2", *common, "hydra.sweep.dir=sweep")
    assert_refused(refused, f"error: MLflow tracking server {auth_server.url}: user 'bob' may not write there (403",
                   auth_server.passwords["bob"])
    # What docs/cluster.md has the admin run: EDIT permission for bob on alice's experiment.
    grant = subprocess.run([sys.executable, "-c", "import os; from mlflow.server import get_app_client; "
                            "get_app_client('basic-auth', tracking_uri=os.environ['MLFLOW_TRACKING_URI'])"
                            f".grant_user_permission('bob', 'experiment', '{experiment}', 'EDIT')"],
                           env={**user_env(auth_server, "admin"), "MLFLOW_TRACKING_URI": auth_server.url},
                           capture_output=True, text=True, timeout=120)
    assert grant.returncode == 0, grant.stderr[-2000:]
    job = zi(tmp_path, bob, "zi_app", *common, "hydra.run.dir=run")
    assert job.returncode == 0, job.stderr[-3000:]
    recorded = MlflowClient(auth_server.url).search_runs([experiment])
    assert [run.info.status for run in recorded] == ["FINISHED"]


def test_the_docs_allowed_hosts_let_clients_use_the_servers_address(auth_server):
    """The server runs with docs/cluster.md's ``--allowed-hosts`` on every address of this machine: a client that
    uses one of the machine's addresses gets its answer, a Host header of another name is refused (403)."""
    port = urllib.parse.urlsplit(auth_server.url).port
    addresses = [ip for ip in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
                 if ":" not in ip]  # IPv4: the docs' list names the machine's addresses as `hostname -I` prints
    assert addresses
    token = base64.b64encode(f"alice:{auth_server.passwords['alice']}".encode()).decode()
    for address in addresses:
        request = urllib.request.Request(f"http://{address}:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, address
    foreign = urllib.request.Request(f"{auth_server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Authorization": f"Basic {token}", "Host": "mlflow.example.org"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(foreign, timeout=30)
    assert refused.value.code == 403
