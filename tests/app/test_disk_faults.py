"""Disks and stores broken for real, at start and under a running job: an immutable store folder with a database
in it, a database with a damaged page, a full disk (a small tmpfs), HOME unset, a read-only working directory,
a store that stops taking writes while a job measures, and a disk that fills in the middle of a sweep. Each is
one line with the right exit status, and nothing measured is lost or reported as fine.

Run as root, as the suite does: ``chattr +i`` (permission bits do not stop root) and ``mount -t tmpfs``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import app_env
from mlflow.tracking import MlflowClient

from zi_app.record import runs as zi_runs, unrecorded

JOB = ["prompt_len=8", "gen_len=2", "warmup=0", "repeat=1"]
TIMEOUT_S = 600


def zi(cwd: Path, *args: str, env: dict = None, module: str = "zi_app") -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``cwd`` (``-m`` first in ``args``: a sweep)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or app_env(cwd),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def one_error(result: subprocess.CompletedProcess, status: int) -> str:
    """The one ``error:`` line of a command that exited with ``status``, with no traceback."""
    assert result.returncode == status, (result.args, result.stdout[-2000:], result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def new_store(db: Path) -> None:
    """A store with its tables and the app's experiment, made as the app makes it."""
    code = ("import sys; from zi_app.record import store; "
            "store.open_experiment('sqlite:///' + sys.argv[1], 'zero-inference')")
    subprocess.run([sys.executable, "-c", code, str(db)], check=True, env=app_env(db.parent), timeout=TIMEOUT_S)


@contextlib.contextmanager
def immutable(folder: Path):
    """``folder`` made immutable (``chattr +i``): no file can be created, renamed or removed in it, as on a
    read-only mount; root included."""
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder``: a small disk of its own that can be filled."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its disk is full; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (2**20, 2**12):  # the last pages too
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
    return filler


def test_an_immutable_store_folder_with_a_database_in_it_is_refused_in_one_line(tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    new_store(db)
    with immutable(db.parent):
        for args in (JOB, ["-m", *JOB, "batch=1,2"]):
            line = one_error(zi(tmp_path, *args), 2)
            assert f"MLflow store sqlite:///{db}: cannot write in {db.parent} (Operation not permitted)" in line


def test_a_database_with_a_damaged_page_is_refused_in_one_line(tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    new_store(db)
    with sqlite3.connect(db) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
    with open(db, "r+b") as out:  # the runs table's first page overwritten, as a bad sector or torn write does
        out.seek((root - 1) * page_size)
        out.write(b"\xab" * page_size)
    for module, args in (("zi_app", JOB), ("zi_app", ["-m", *JOB, "batch=1,2"]), ("zi_app.zi_best", [])):
        line = one_error(zi(tmp_path, *args, module=module), 2)
        assert f"{db} is damaged (sqlite's quick_check: " in line and ".recover" in line, line


def test_a_full_disk_at_start_is_refused_in_one_line(tmp_path):
    """The working directory on a full disk (Hydra cannot write the run's folder), and the store on a full disk
    with the working directory elsewhere (the store is refused before anything loads)."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        fill(disk)
        line = one_error(zi(disk, *JOB, env=app_env(tmp_path)), 2)
        assert "cannot write " in line and "(No space left on device)" in line, line
        uri = f"sqlite:///{disk}/mlruns/mlflow.db"
        for args in (JOB, ["-m", *JOB, "batch=1,2"]):
            line = one_error(zi(tmp_path, *args, f"tracking.uri={uri}"), 2)
            assert line.startswith(f"error: MLflow store {uri}: ") and ("is full" in line or "No space left" in line)


def test_home_unset_still_runs_a_job(tmp_path):
    """``cache_dir`` defaults to ``~/.cache/...``, which is the user's home also without HOME."""
    env = {k: v for k, v in app_env(tmp_path).items() if k not in ("HOME", "ZI_CACHE_DIR")}
    result = zi(tmp_path, *JOB, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.quick
def test_a_read_only_working_directory_is_one_line_even_for_a_dry_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with immutable(work):
        for args in (["dry_run=true"], JOB):
            line = one_error(zi(work, *args, env=app_env(tmp_path)), 2)
            assert f"cannot write {work}/outputs" in line and "(Operation not permitted)" in line, line
            assert "hydra.run.dir" in line


def test_a_job_that_measured_but_could_not_record_keeps_its_result_and_says_where(tmp_path):
    """The store's folder made immutable while the job generates: SQLite can no longer write its journal there.
    The job measures to the end, writes result.json in its output folder, and says so in one line, exit 1."""
    db = tmp_path / "mlruns" / "mlflow.db"
    job = subprocess.Popen([sys.executable, "-m", "zi_app", "prompt_len=8", "gen_len=400", "warmup=0", "repeat=1"],
                           cwd=tmp_path, env=app_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + TIMEOUT_S
    loaded = False
    while not loaded and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(Exception):  # the store may be in the middle of its creation
            for run_file in tmp_path.rglob(zi_runs.RUN_ID_FILE):
                loaded = "load_s" in MlflowClient(f"sqlite:///{db}").get_run(run_file.read_text()).data.metrics
    assert loaded, "the job never loaded its model"
    with immutable(db.parent):
        out, err = job.communicate(timeout=TIMEOUT_S)
        result = subprocess.CompletedProcess(job.args, job.returncode, out, err)
        line = one_error(result, 1)
    assert f"the job's MLflow run could not be recorded in sqlite:///{db} (" in line, line
    saved = Path(line.rsplit("what it measured is in ", 1)[1])
    assert saved.name == unrecorded.RESULT_FILE and saved.is_relative_to(tmp_path / "outputs")
    kept = json.loads(saved.read_text())
    assert kept["metrics"]["tokens_per_sec"] > 0 and len(kept["generated_token_ids"][0]) == 400


def test_a_disk_filling_in_the_middle_of_a_sweep_never_leaves_it_finished(tmp_path):
    """The store's disk fills once the first of three jobs is recorded: the other two are refused in one line
    each, and the sweep neither ends FINISHED nor says "0 failed"."""
    with tmpfs(tmp_path / "disk", "64m") as disk:
        db = disk / "mlruns" / "mlflow.db"
        sweep = subprocess.Popen([sys.executable, "-m", "zi_app", "-m", *JOB, "batch=1,2,3",
                                  f"tracking.uri=sqlite:///{db}", "hydra.sweep.dir=sweep"], cwd=tmp_path,
                                 env=app_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        filled = threading.Event()

        def fill_after_the_first_job() -> None:
            while sweep.poll() is None:
                with contextlib.suppress(Exception):
                    client = MlflowClient(f"sqlite:///{db}")
                    done = client.search_runs([client.get_experiment_by_name("zero-inference").experiment_id],
                                              "attributes.status = 'FINISHED'")
                    if done:
                        fill(disk)
                        filled.set()
                        return
                time.sleep(0.2)

        filler = threading.Thread(target=fill_after_the_first_job)
        filler.start()
        out, err = sweep.communicate(timeout=TIMEOUT_S)
        filler.join()
        assert filled.is_set(), err[-3000:]
        assert sweep.returncode == 1, (out[-2000:], err[-3000:])
        for job in ("#1 batch=2", "#2 batch=3"):
            assert f"{job}: FAILED StoreError: MLflow store sqlite:///{db}: the disk holding" in out, out[-3000:]
        assert "Traceback" not in out + err
        assert not any(line.startswith("Sweep finished") and "0 failed" in line for line in out.splitlines()), out
        (disk / "filler").unlink()
        client = MlflowClient(f"sqlite:///{db}")
        parents = client.search_runs([client.get_experiment_by_name("zero-inference").experiment_id],
                                     f"tags.`{zi_runs.ROLE_TAG}` = 'sweep'")
        assert [parent.info.status for parent in parents] != ["FINISHED"], parents
