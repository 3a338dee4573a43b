"""The MLflow UI on a sweep's store: the real ``mlflow server`` on 127.0.0.1, its REST API, and the
runs page the sweep's summary points to, rendered by headless Chromium (Debian's ``chromium``)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright

from zi_app import tracking

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKENS_COLUMN = "metrics.`tokens_per_sec`"


def app_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in (tracking.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-job sweep; returns its folder, its summary (stdout) and the best-run command's answer."""
    root = tmp_path_factory.mktemp("ui-sweep")
    run = subprocess.run([sys.executable, "-m", "zi_app", "-m", "batch=1,2", "prompt_len=16", "gen_len=4",
                          "warmup=0", "repeat=1"], cwd=root, env=app_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    best = subprocess.run([sys.executable, "-m", "zi_app.best", "--json"], cwd=root, env=app_env(),
                          capture_output=True, text=True, timeout=120)
    assert best.returncode == 0, best.stderr
    return root, run.stdout, json.loads(best.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(sweep):
    """``mlflow server`` on the sweep's store, as the README says to start it; stopped with SIGTERM."""
    root = sweep[0]
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                f"sqlite:///{root}/mlruns/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1"], cwd=root, env=app_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield base
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    log.close()


def rest(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def summary_url(stdout: str, base: str) -> str:
    """The sweep summary's link to its runs, pointed at the test's server."""
    url = re.search(r"This sweep's runs, best first: (\S+)", stdout).group(1)
    return url.replace("http://127.0.0.1:5000", base)


def test_rest_api_orders_the_runs_as_the_best_run_command(sweep, server):
    _, stdout, best = sweep
    parent = re.search(r"sweep parent run (\w+)", stdout).group(1)
    order = ["metrics.tokens_per_sec DESC"]
    runs = rest(server, "runs/search", {"experiment_ids": [best["experiment_id"]], "order_by": order})["runs"]
    assert runs[0]["info"]["run_id"] == best["run_id"]
    children = rest(server, "runs/search", {"experiment_ids": [best["experiment_id"]], "order_by": order,
                                            "filter": f"tags.mlflow.parentRunId = '{parent}'"})["runs"]
    assert len(children) == 2 and children[0]["info"]["run_id"] == best["run_id"]


def toggle_columns(page, names) -> None:
    """Flip ``names`` in the runs table's column chooser (metrics are not shown by default)."""
    page.get_by_role("button", name="Columns", exact=True).click()
    for name in names:
        page.get_by_placeholder("Search columns").fill(name)
        title = page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$"))
        page.locator(".du-bois-light-tree-treenode").filter(has=title).locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")


def by_row(page, column: str, attribute: str | None = None) -> list:
    """The values of a runs-table column, in the order the rows are shown."""
    cells = page.locator(f'[role=gridcell][col-id="{column}"]')
    cells.first.wait_for()
    pairs = cells.evaluate_all(
        "(cells, attribute) => cells.map(c => [Number(c.closest('[row-index]').getAttribute('row-index')),"
        " attribute ? c.querySelector('a').getAttribute(attribute) : c.textContent])", attribute)
    return [value for _, value in sorted(pairs)]


def test_the_runs_page_lists_the_sweep_best_first(sweep, server, tmp_path):
    root, stdout, best = sweep
    jobs = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").search_runs(
        [best["experiment_id"]], f"tags.`{tracking.ROLE_TAG}` = 'job'")
    tokens = {run.info.run_id: run.data.metrics["tokens_per_sec"] for run in jobs}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(  # a fresh profile: no remembered columns
            tmp_path / "chromium-profile", executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 520})
        try:
            page = browser.new_page()
            page.goto(summary_url(stdout, server))
            page.wait_for_selector("text=2 matching runs", timeout=120_000)
            close = page.get_by_role("button", name="Close")
            if close.count():  # the assistant panel takes half the page, and the grid draws visible columns only
                close.first.click()
            toggle_columns(page, ["tokens_per_sec", "peak_host_rss_bytes", "batch", "Dataset", "Source", "Models"])
            links = by_row(page, "attributes.`Run Name`", "href")
            shown = by_row(page, TOKENS_COLUMN)
            page.screenshot(path=tmp_path / "mlflow-ui.png")
        finally:
            browser.close()
    run_ids = [link.rsplit("/", 1)[-1] for link in links]
    assert run_ids[0] == best["run_id"] and sorted(run_ids) == sorted(tokens)
    assert [float(value) for value in shown] == sorted(tokens.values(), reverse=True)
    assert (tmp_path / "mlflow-ui.png").stat().st_size > 10_000
