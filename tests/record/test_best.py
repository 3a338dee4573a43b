"""``python -m zi_app.zi_best`` on a store holding GPU-like results: the latest sweep by default, a given
sweep or experiment, and the fastest run under a GPU memory cap. The runs are written with MLflow's
client, as the app writes them (a CPU machine cannot produce GPU peaks)."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from zi_app import zi_best as best
from zi_app.record import runs, store as zi_store
from zi_app.config.paths import command

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

GIB = 2**30


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep in experiment 'other', then two in 'zero-inference' (the last one is the latest sweep);
    returns the store's URI and each sweep's run ids."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('best')}/mlruns/mlflow.db"
    client = MlflowClient(uri)

    def sweep(experiment: str, jobs: dict) -> dict:
        experiment_id = zi_store.open_experiment(uri, experiment)
        parent = runs.start_sweep_run(experiment_id, "sweep", {})
        ids = {}
        for overrides, (tokens, gpu_reserved) in jobs.items():
            run = client.create_run(experiment_id, tags={runs.OVERRIDES_TAG: overrides, runs.ROLE_TAG: "job",
                                                         "mlflow.parentRunId": parent})
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[
                Metric("tokens_per_sec", tokens, now, 0), Metric("peak_gpu_allocated_bytes", gpu_reserved * 0.9, now, 0),
                Metric("peak_gpu_reserved_bytes", gpu_reserved, now, 0),
                Metric("peak_host_rss_bytes", 30 * GIB, now, 0)])
            client.set_terminated(run.info.run_id, "FINISHED")
            ids[overrides] = run.info.run_id
        client.set_terminated(parent, "FINISHED")
        return {"parent": parent, **ids}

    other = sweep("other", {"batch=1 pin=false": (0.24, 8 * GIB)})
    older = sweep("zero-inference", {"batch=64 pin=true": (93.8, 60 * GIB)})
    time.sleep(0.01)  # start times (ms) order the sweeps
    newer = sweep("zero-inference", {"batch=32 pin=true": (48.1, 40 * GIB), "batch=64 pin=true": (93.8, 70 * GIB),
                                     "batch=128 pin=true": (162.8, 138 * GIB)})
    return uri, older, newer, other


def best_json(capsys, uri: str, *args: str) -> dict:
    assert best.main(["--tracking-uri", uri, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_latest_sweep_by_default(store, capsys):
    uri, _, newer, other = store
    found = best_json(capsys, uri)
    assert found["run_id"] == newer["batch=128 pin=true"]
    # It says which sweep it picked: the latest of the default experiment (a local store: anyone's)
    assert found["ranked"] == f"the latest sweep of experiment 'zero-inference', sweep {newer['parent']}"
    # The latest of another experiment, though a later sweep exists elsewhere
    assert best_json(capsys, uri, "--experiment", "other")["ranked"].endswith(f"sweep {other['parent']}")


def test_fastest_under_a_gpu_memory_cap(store, capsys):
    uri, _, newer, _ = store
    capped = best_json(capsys, uri, "--max-peak-gpu-gib", "80")
    assert capped["run_id"] == newer["batch=64 pin=true"]
    assert (capped["peak_gpu_reserved_gib"], capped["peak_gpu_allocated_gib"]) == (70.0, 63.0)
    assert best.main(["--tracking-uri", uri, "--max-peak-gpu-gib", "80"]) == 0
    text = capsys.readouterr().out
    assert "highest tokens_per_sec with peak reserved GPU <= 80 GiB" in text
    assert "peak GPU:        63.00 GiB allocated, 70.00 GiB reserved" in text
    assert best.main(["--tracking-uri", uri, "--max-peak-gpu-gib", "10"]) == best.EXIT_NONE_QUALIFIES
    assert "no completed run with metric tokens_per_sec with peak reserved GPU <= 10 GiB" in capsys.readouterr().err


def test_a_given_sweep_or_experiment(store, capsys):
    uri, older, newer, other = store
    assert best_json(capsys, uri, "--parent", older["parent"])["run_id"] == older["batch=64 pin=true"]
    assert best_json(capsys, uri, "--experiment", "other")["run_id"] == other["batch=1 pin=false"]
    # The whole experiment: both sweeps, and the lowest reserved peak wins when asked.
    lowest = best_json(capsys, uri, "--experiment", "zero-inference", "--every-sweep", "--metric",
                       "peak_gpu_reserved_bytes", "--minimize")
    assert lowest["run_id"] == newer["batch=32 pin=true"]
    assert lowest["ranked"] == "experiment 'zero-inference'"
    highest = best_json(capsys, uri, "--experiment", "zero-inference", "--every-sweep")
    assert highest["run_id"] == newer["batch=128 pin=true"]


def test_bad_input_is_named(store, capsys, tmp_path):
    uri = store[0]
    assert best.main(["--tracking-uri", uri, "--experiment", "nope"]) == best.EXIT_BAD_INPUT
    assert "--experiment 'nope': no such experiment (there are: " in capsys.readouterr().err
    assert best.main(["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == best.EXIT_BAD_INPUT
    assert "no MLflow store there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        best.main(["--max-peak-gpu-gib", "0"])
    assert "argument --max-peak-gpu-gib: '0' is not allowed: a positive number of GiB" in capsys.readouterr().err


def test_parent_by_a_unique_prefix_of_its_run_id(store, capsys, tmp_path):
    """The docs and MLflow's UI shorten run ids: a prefix naming one sweep is enough; one that several
    sweeps' ids share is refused, naming them."""
    uri, older, _, _ = store
    assert best_json(capsys, uri, "--parent", older["parent"][:12])["run_id"] == older["batch=64 pin=true"]
    own = f"sqlite:///{tmp_path}/mlflow.db"  # sweeps of its own: the shared store's latest sweep stays the latest
    experiment_id = zi_store.open_experiment(own, "zero-inference")
    seen = {}
    while True:  # sweeps until two ids share their first character (run ids are random hex)
        parent = runs.start_sweep_run(experiment_id, "sweep", {})
        if parent[0] in seen:
            break
        seen[parent[0]] = parent
    assert best.main(["--tracking-uri", own, "--parent", parent[0]]) == best.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"--parent {parent[0]!r} is ambiguous: the run ids of 2 sweeps start with it" in error
    assert parent in error and seen[parent[0]] in error
    assert best.main(["--tracking-uri", own, "--parent", "xyz"]) == best.EXIT_BAD_INPUT
    assert "--parent 'xyz': no such run in this store, and no sweep's run id starts with it" in capsys.readouterr().err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        best.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "the best run of the latest sweep" in text.lower()


def test_a_store_without_sweeps_says_how_to_run_one(capsys, tmp_path):
    """The command it suggests is this environment's app, runnable as printed from any shell."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    zi_store.open_experiment(uri, "zero-inference")
    assert best.main(["--tracking-uri", uri]) == best.EXIT_BAD_INPUT
    assert f"no sweep in experiment 'zero-inference' (run one with `{command('zi', 'zi_app')} -m ...`)" in \
        capsys.readouterr().err
