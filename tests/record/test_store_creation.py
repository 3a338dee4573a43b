"""A new SQLite store cannot be bricked by a signal (issue 24, item 1): MLflow makes its tables and runs its
migrations for seconds on a store's first use, and a SIGTERM then used to leave tables half-made, refused by
every later command. The tables are now made in a file of their own and renamed into place; a store an
older version left half-made is named in one line with what to do.

Real processes, real signals: ``zi`` is stopped at several moments of its first seconds on a new store, timed
from the store's lock file appearing (the moment creation starts), and the next command must work.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import app_env
from helpers.signals import terminal_signals

JOB = ["-m", "zi_app", "prompt_len=8", "gen_len=2", "warmup=0", "repeat=1"]


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("after_s", [0.0, 0.4, 1.0, 2.0])
def test_a_signal_while_a_new_store_is_created_leaves_it_usable(tmp_path, after_s):
    lock = tmp_path / "mlruns" / "mlflow.db.lock"
    first = subprocess.Popen([sys.executable, *JOB], cwd=tmp_path, env=app_env(tmp_path), start_new_session=True,
                             preexec_fn=terminal_signals, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(after_s)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode in (0, 128 + signal.SIGTERM), err[-3000:]
    assert not list((tmp_path / "mlruns").glob(".*.creating")), "a temporary store was left behind"
    after = subprocess.run([sys.executable, *JOB], cwd=tmp_path, env=app_env(tmp_path), capture_output=True,
                           text=True, timeout=600)
    assert after.returncode == 0, (after_s, err[-2000:], after.stderr[-3000:])
    assert "already exists" not in after.stderr and "Traceback" not in after.stderr


def test_a_store_left_half_created_is_named_in_one_line(tmp_path):
    """What a stopped migration of MLflow's left behind: some tables, and alembic's work table. The job, the
    sweep and the best-run command each name it in one line."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER PRIMARY KEY)")
    for command in (JOB, ["-m", "zi_app", "-m", "batch=1,2"], ["-m", "zi_app.zi_best"]):
        result = subprocess.run([sys.executable, *command], cwd=tmp_path, env=app_env(tmp_path), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 2, (command, result.stderr[-3000:])
        [line] = error_lines(result.stderr)
        assert f"{db} was left half-created" in line and f"mv {db} {db}.broken" in line, line
        assert "Traceback" not in result.stderr and "loading" not in result.stderr
