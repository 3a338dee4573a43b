"""What the end of a sweep is made of, checked piece by piece on a real MLflow store: the plot and
tables of a batch x pin sweep, runs left RUNNING by dead processes, jobs that died before opening a run,
and how failures are classified."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from zi_app.record import orphans, results as sweep, runs as zi_runs, settle, store, sweep_end
from zi_app import ConfigError

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

TOKENS = {("1", "true"): 10.0, ("8", "true"): 60.0, ("32", "true"): None, ("1", "false"): 2.0, ("8", "false"): 12.0,
          ("32", "false"): 30.0}  # None: failed (oom)


def batch_pin_rows():
    rows = []
    for i, ((batch, pin), tokens) in enumerate(TOKENS.items()):
        metrics = {} if tokens is None else {sweep.METRIC: tokens, sweep.HOST_RSS: (1 + i) * sweep.GIB}
        rows.append(sweep.JobRow(run_id=f"run{i}", experiment_id="1", overrides=f"batch={batch} pin={pin} gen_len=4",
                                 status="FINISHED" if tokens else "FAILED", failure_kind="" if tokens else "oom",
                                 failure_message="" if tokens else "OutOfMemoryError: CUDA out of memory.",
                                 metrics=metrics, artifact_uri="file:///nowhere", start_time=i))
    return rows


def test_plot_has_a_line_per_pin_value_and_marks_the_failed_point():
    fig = sweep.plot(batch_pin_rows())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pin=true", "pin=false"]
    assert ax.get_legend().get_title().get_text() == "pin"
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert list(lines["pin=true"].get_xdata()) == [1, 8] and list(lines["pin=true"].get_ydata()) == [10.0, 60.0]
    assert list(lines["pin=false"].get_xdata()) == [1, 8, 32]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "X"]
    assert len(crosses) == 1 and (list(crosses[0].get_xdata()), list(crosses[0].get_ydata())) == ([32.0], [0])
    assert crosses[0].get_color() == lines["pin=true"].get_color()
    assert [t.get_text() for t in ax.texts] == ["oom"]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "batch"
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:4] == b"\x89PNG"


def test_failures_at_one_batch_share_one_label():
    """Both pin values failing at the same batch (the usual case past the budget): two crosses, one label
    naming both kinds, so labels of neighbouring batches cannot overprint each other."""
    rows = batch_pin_rows()
    rows[5].status, rows[5].failure_kind, rows[5].metrics = "FAILED", "killed", {}
    ax = sweep.plot(rows).axes[0]
    assert len([line for line in ax.get_lines() if line.get_marker() == "X"]) == 2
    assert [(t.get_text(), t.get_rotation()) for t in ax.texts] == [("killed, oom", 90.0)]


def test_tables_rank_completed_jobs_and_list_failures():
    rows = batch_pin_rows()
    top = sweep.best(rows)
    assert top.overrides == "batch=8 pin=true gen_len=4"
    console = sweep.console_table(rows, top).splitlines()
    assert console[0].split()[:2] == ["batch", "pin"]
    assert console[2].split()[:3] == ["best", "batch=8", "pin=true"]
    assert [line.split()[3] for line in console[3:7]] == ["30.00", "12.00", "10.00", "2.00"]  # unmarked rows: 4th word
    assert console[7].split()[:4] == ["FAILED", "batch=32", "pin=true", "FAILED"]
    assert console[8].strip() == "batch=32 pin=true: oom: OutOfMemoryError: CUDA out of memory."
    markdown = sweep.markdown_table(rows, top)
    assert markdown.startswith("Every job: `gen_len=4`")
    assert "| best | batch=8 pin=true | FINISHED | 60.00 | 2.00 | run1 |  |" in markdown
    table = list(csv.DictReader(io.StringIO(sweep.csv_table(rows, top))))
    assert [(r["batch"], r["pin"], r["status"]) for r in table][2] == ("32", "true", "FAILED")
    assert table[1]["best"] == "True" and table[1][sweep.METRIC] == "60.0"


def test_rank_applies_memory_caps():
    rows = batch_pin_rows()  # run i peaks at (1 + i) GiB of host memory
    assert [r.run_id for r in sweep.rank(rows, max_host_gib=2.5)] == ["run1", "run0"]
    assert sweep.rank(rows, max_gpu_gib=100) == []  # no GPU metrics: none is known to fit
    assert [r.run_id for r in sweep.rank(rows, minimize=True)][0] == "run3"


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = store.absolute_uri("sqlite:///mlruns/mlflow.db")
    experiment_id = store.open_experiment(uri, "zero-inference")
    return MlflowClient(uri), experiment_id


def dead_pid() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return str(process.pid)


def test_runs_of_dead_processes_are_marked_killed(client):
    client, experiment_id = client
    parent = zi_runs.start_sweep_run(experiment_id, "sweep", {})
    here = zi_runs.process_tags()
    elsewhere = {zi_runs.PID_TAG: "1", zi_runs.HOST_TAG: "another-host"}

    def run(tags):
        return client.create_run(experiment_id, tags=tags).info.run_id

    dead = run({**here, zi_runs.PID_TAG: dead_pid()})
    # Our pid, but the process that held it when the run started began earlier: the pid was reused.
    reused = run({**here, zi_runs.PID_START_TAG: repr(float(here[zi_runs.PID_START_TAG]) - 60)})
    alive = run(here)
    remote_job = run({**elsewhere, "mlflow.parentRunId": parent})
    remote_other = run(elsewhere)
    closed, running = orphans.reap_dead_runs(client, [experiment_id], "gone")
    assert (sorted(closed), running) == (sorted([dead, reused]), set())
    status = {r: client.get_run(r).info.status for r in (dead, reused, alive, remote_job, remote_other, parent)}
    assert status == {dead: "FAILED", reused: "FAILED", alive: "RUNNING", remote_job: "RUNNING",
                      remote_other: "RUNNING", parent: "RUNNING"}
    assert client.get_run(dead).data.tags[zi_runs.FAILURE_KIND_TAG] == "killed"
    orphans.reap_dead_runs(client, [experiment_id], "sweep over", parent_run_id=parent)
    assert client.get_run(remote_job).info.status == "FAILED"  # the sweep is over: it cannot still run
    assert client.get_run(remote_other).info.status == "RUNNING"
    assert client.get_run(parent).info.status == "RUNNING"


def test_a_job_that_died_before_opening_its_run_gets_a_failed_run(client, tmp_path, compose, monkeypatch):
    client, experiment_id = client
    parent = zi_runs.start_sweep_run(experiment_id, "sweep", {})
    monkeypatch.setenv(zi_runs.PARENT_RUN_ENV, parent)
    state = sweep_end.Sweep(uri=client.tracking_uri, experiment_id=experiment_id, parent_run_id=parent,
                            sweep_dir=tmp_path / "sweep", output_subdir=".hydra", started=0.0)
    job_dir = tmp_path / "sweep" / "0"
    (job_dir / ".hydra").mkdir(parents=True)
    config = compose("batch=4")
    OmegaConf.save(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), job_dir / ".hydra/config.yaml")
    OmegaConf.save(OmegaConf.create(["batch=4"]), job_dir / ".hydra/overrides.yaml")
    settle.settle_unrecorded_jobs(state)
    settle.settle_unrecorded_jobs(state)  # once only: the new run's id is written to the job's folder
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 1 and runs[0].info.run_id == (job_dir / "mlflow_run_id").read_text()
    assert runs[0].info.status == "FAILED" and runs[0].data.tags[zi_runs.FAILURE_KIND_TAG] == "killed"
    assert runs[0].data.tags[zi_runs.OVERRIDES_TAG] == "batch=4" and runs[0].data.params["batch"] == "4"


def test_jobs_that_ran_but_left_no_run_keep_the_sweep_from_finishing(client, tmp_path, capsys):
    """Three jobs launched, one recorded (the store refused the others' writes, a full disk): the sweep says so,
    counts none of them as "never ran", and its parent is FAILED, not FINISHED with "0 failed"."""
    client, experiment_id = client
    parent = zi_runs.start_sweep_run(experiment_id, "sweep", {})
    job = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, zi_runs.OVERRIDES_TAG: "batch=1",
                                                 zi_runs.ROLE_TAG: "job"}).info.run_id
    client.log_metric(job, "tokens_per_sec", 5.0)
    client.set_terminated(job, "FINISHED")
    jobs = ["batch=1", "batch=2", "batch=3"]
    state = sweep_end.Sweep(uri=client.tracking_uri, experiment_id=experiment_id, parent_run_id=parent,
                            sweep_dir=tmp_path / "sweep", output_subdir=None, started=0.0, planned=jobs, launched=jobs)
    sweep_end.close_sweep(state, None)
    out = capsys.readouterr().out
    assert "Sweep finished: 1 jobs, 0 failed, 2 never recorded\n" in out
    assert "batch=2 (never recorded); batch=3 (never recorded)" in out
    closed = client.get_run(parent)
    assert closed.info.status == "FAILED"
    assert closed.data.tags[sweep_end.UNRECORDED_TAG] == "2" and sweep_end.NEVER_RAN_TAG not in closed.data.tags


def test_failure_kinds():
    import torch

    with pytest.raises(RuntimeError) as host_oom:
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator refuses: host memory
    assert zi_runs.failure_kind(host_oom.value) == "oom"
    assert zi_runs.failure_kind(ConfigError("batch", 0, "a positive integer")) == "invalid-config"
    assert zi_runs.failure_kind(ValueError("boom")) == "error"


def test_ui_address_of_a_sweep():
    assert sweep.view_url("sqlite:///mlruns/mlflow.db", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=abc&workflowType=machine_learning"
    assert sweep.view_state("abc") == {"searchFilter": "tags.mlflow.parentRunId = 'abc'",
                                       "orderByKey": "metrics.`tokens_per_sec`", "orderByAsc": False,
                                       "selectedColumns": ["metrics.`tokens_per_sec`", "metrics.`decode_step_s`",
                                                           "metrics.`peak_gpu_reserved_gib`",
                                                           "metrics.`peak_host_rss_gib`", "tags.`zi.failure_kind`"]}
    mlflow = Path(sys.executable).parent / "mlflow"  # this environment's, by absolute path: works in any shell
    assert sweep.ui_command("sqlite:///mlruns/mlflow.db") == \
        f"{mlflow} ui --backend-store-uri sqlite:///{Path('mlruns/mlflow.db').resolve()} --host 127.0.0.1"
    assert sweep.run_url("http://alice:pw@tracker:5000/", "3", "abc") == \
        "http://tracker:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
