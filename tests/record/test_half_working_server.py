"""A tracking server that is up and broken: a stub that answers ``/health`` and then 503s or hangs on every API
call. ``zi``, ``zi -m`` and ``zi-best`` refuse it within about 30 s (``HALF_WORKING_WAIT_S``, whatever
``tracking.connect_timeout_s`` allows), in one line naming what failed, with exit status 2: where MLflow's own
retries took 250 s for the 503s and never ended for the hang."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import app_env

from zi_app.record import server as zi_server

STARTUP_S = 40  # Python, Hydra and the MLflow client starting beside other tests on 2 cores


class HalfWorking(http.server.ThreadingHTTPServer):
    """``/health`` answers 200; every other path answers 503 (``mode="503"``) or nothing until closed."""

    daemon_threads = True

    def __init__(self, mode: str) -> None:
        self.mode, self.released = mode, threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self._answer(200, b"OK")
        elif self.server.mode == "503":
            self._answer(503, b"backend store unavailable")
        else:
            self.server.released.wait()  # hangs, as a server whose database stopped answering does

    do_POST = do_GET

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["503", "hang"])
def half_working(request):
    """The URL of a stub server answering /health only, in both modes."""
    stub = HalfWorking(request.param)
    thread = threading.Thread(target=stub.serve_forever, daemon=True)
    thread.start()
    yield request.param, f"http://127.0.0.1:{stub.server_address[1]}"
    stub.released.set()
    stub.shutdown()
    stub.server_close()


def test_a_server_answering_health_but_failing_its_api_is_refused_in_one_line(tmp_path, half_working):
    mode, url = half_working
    commands = {"job": ["-m", "zi_app", f"tracking.uri={url}", "gen_len=2"],  # connect_timeout_s at its 120
                "sweep": ["-m", "zi_app", "-m", f"tracking.uri={url}", "batch=1,2"],
                "best": ["-m", "zi_app.zi_best", "--tracking-uri", url]}
    start = time.monotonic()
    # All at once: each waits about 30 s for the server, not for the CPU.
    processes = {name: subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=app_env(Path(tmp_path)),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, args in commands.items()}
    outputs = {name: process.communicate(timeout=600) for name, process in processes.items()}
    seconds = time.monotonic() - start
    said = ("its API answers HTTP 503 Service Unavailable" if mode == "503" else
            f"its API does not answer within {zi_server.STORE_TIMEOUT_S} s")
    for name, (out, err) in outputs.items():
        assert processes[name].returncode == 2, (name, out[-2000:], err[-3000:])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (name, err[-3000:])
        assert errors[0].startswith(f"error: MLflow tracking server {url} is not working: it answers /health, but "
                                    f"{said} (GET /api/2.0/mlflow/experiments/get-by-name"), errors[0]
        assert "Traceback" not in err
    # The job and the sweep retried up to the bound (zi-best does not wait), then stopped.
    assert "retried for 30 s" in outputs["job"][1] and "retried for 30 s" in outputs["sweep"][1]
    assert "retrying for up to" in outputs["job"][1]
    bound = zi_server.HALF_WORKING_WAIT_S + zi_server.STORE_TIMEOUT_S + zi_server.RETRY_EVERY_S
    assert seconds < bound + STARTUP_S, seconds
    assert not list(tmp_path.rglob("mlflow_run_id")), "no job started"


@pytest.mark.quick
def test_mlflow_requests_are_bounded_unless_the_user_set_them(monkeypatch):
    """MLflow's own retries and timeout (4 minutes for 503s, 120 s per hung request) are ours for a server URI,
    a value the user set is kept."""
    from zi_app.record import store

    # Set, then deleted: monkeypatch then removes what the app sets when the test ends.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "unset")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    store.absolute_uri("http://127.0.0.1:5000")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
