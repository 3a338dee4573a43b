"""The MLflow UI on a sweep's store: the real ``mlflow server`` on 127.0.0.1, its REST API, and the
runs page the sweep's summary points to, rendered by headless Chromium (Debian's ``chromium``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from helpers.services import free_port, wait_healthy
from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright

from zi_app.record import runs as zi_runs, sweep_end

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKENS_COLUMN = "metrics.`tokens_per_sec`"


def app_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in (zi_runs.PARENT_RUN_ENV, "MLFLOW_RUN_ID")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, forked_jobs, forked_python):
    """A two-job sweep; returns its folder, its summary (stdout) and the best-run command's answer."""
    root = tmp_path_factory.mktemp("ui-sweep")
    run = subprocess.run([*forked_python(), "-m", "zi_app", "-m", "batch=1,2", "prompt_len=16", "gen_len=4",
                          "warmup=0", "repeat=1", *forked_jobs()], cwd=root, env=app_env(), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    best = subprocess.run([*forked_python(), "-m", "zi_app.zi_best", "--json"], cwd=root, env=app_env(),
                          capture_output=True, text=True, timeout=120)
    assert best.returncode == 0, best.stderr
    return root, run.stdout, json.loads(best.stdout)


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
    wait_healthy(base, process, root / "server.log")
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


def by_row(page, column: str, link: bool = False) -> list:
    """The text of a runs-table column (of its link, with ``link``), in the order the rows are shown."""
    cells = page.locator(f'[role=gridcell][col-id="{column}"]')
    cells.first.wait_for()
    pairs = cells.evaluate_all(
        "(cells, link) => cells.map(c => [Number(c.closest('[row-index]').getAttribute('row-index')),"
        " (link ? c.querySelector('a') : c).textContent.trim()])", link)
    return [value for _, value in sorted(pairs)]


def browser(playwright, profile):
    """Headless Chromium with a fresh profile: no columns or view remembered from an earlier visit."""
    return playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
                                                         viewport={"width": 1600, "height": 520})


def test_the_sweep_link_shows_its_runs_by_name_best_first_with_their_figures(sweep, server, tmp_path):
    """What a person reads on the page the sweep's summary links to: its jobs named by what varies, best
    first, with tokens/sec (rounded), decode step time and peak memory (GiB) as columns (nothing to choose by hand)."""
    root, stdout, best = sweep
    jobs = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").search_runs(
        [best["experiment_id"]], f"tags.`{zi_runs.ROLE_TAG}` = 'job'")
    tokens = {run.info.run_name: run.data.metrics["tokens_per_sec"] for run in jobs}
    with sync_playwright() as playwright:
        context = browser(playwright, tmp_path / "chromium-profile")
        try:
            page = context.new_page()
            page.goto(summary_url(stdout, server))
            page.wait_for_selector("text=2 matching runs", timeout=120_000)
            close = page.get_by_role("button", name="Close")
            if close.count():  # the assistant panel takes half the page, and the grid draws visible columns only
                close.first.click()
            names = by_row(page, "attributes.`Run Name`", link=True)
            shown = by_row(page, TOKENS_COLUMN)
            headers = page.locator(".ag-header-cell[col-id]").evaluate_all(
                "cells => cells.map(c => c.getAttribute('col-id'))")
            page.screenshot(path=tmp_path / "mlflow-ui.png")
        finally:
            context.close()
    assert names == sorted(tokens, key=tokens.get, reverse=True) and sorted(names) == ["batch=1", "batch=2"]
    assert [float(value) for value in shown] == sorted(tokens.values(), reverse=True)
    # tokens/s as a person reads it: at most 4 significant digits (runs.RATE_DIGITS), not 15.
    assert all(len(value.replace(".", "").lstrip("0")) <= zi_runs.RATE_DIGITS for value in shown), shown
    # Memory in GiB (the failure kind's column shows only where a job failed: none did here).
    assert {TOKENS_COLUMN, "metrics.`decode_step_s`", "metrics.`peak_host_rss_gib`"} <= set(headers)
    assert (tmp_path / "mlflow-ui.png").stat().st_size > 10_000


def test_the_parent_run_link_opens_its_artifacts_in_the_model_training_view(sweep, server, tmp_path):
    _, stdout, _ = sweep
    url = re.search(r"Its parent run \(table, plot\): (\S+)", stdout).group(1).replace("http://127.0.0.1:5000", server)
    with sync_playwright() as playwright:
        context = browser(playwright, tmp_path / "chromium-profile")
        try:
            page = context.new_page()
            page.goto(url)
            page.get_by_text("Model metrics").first.wait_for(timeout=120_000)  # the model-training run page's tabs
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("throughput.png").first.wait_for(timeout=60_000)
            listed = [name for name in sweep_end.ARTIFACTS.values() if page.get_by_text(name).count()]
            shown_url = page.url
        finally:
            context.close()
    assert sorted(listed) == sorted(sweep_end.ARTIFACTS.values())
    assert "workflowType=machine_learning" in shown_url
