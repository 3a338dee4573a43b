"""The best run of a sweep or an experiment, read back from the store: which runs to rank (the latest sweep,
a given one, or every job of an experiment), whether the sweep finished, and what to say about the winner.
The ``zi-best`` command (:mod:`zi_app.zi_best`) ranks and prints them.
"""

from __future__ import annotations

import shlex
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

from zi_app.config.paths import command
from zi_app.record import results, runs, store, sweep_end
from zi_app.record.redaction import redact_text
from zi_app.record.results import JobRow

DS_CONFIG = "ds_config.json"


class InputError(Exception):
    """A store, run or experiment that does not exist; the message says which and what to do."""


def open_store(uri: str):
    """An MlflowClient on ``uri``, after the store's check (:func:`store.check_store`, reading only);
    a local SQLite store must already exist (never create an empty one)."""
    from mlflow.tracking import MlflowClient

    uri = store.absolute_uri(uri)
    if uri.startswith(store.SQLITE_PREFIX) and not Path(uri[len(store.SQLITE_PREFIX):]).is_file():
        raise InputError(f"--tracking-uri {uri}: no MLflow store there; run from the directory the sweep ran in, "
                         f"or pass --tracking-uri")
    try:
        store.check_store(uri, write=False)
    except store.StoreError as error:
        raise InputError(str(error)) from None
    return MlflowClient(uri)


def close_dead_runs(client) -> None:
    """Close the runs whose process is gone, so that none is counted as running, and settle the sweeps whose
    jobs ended after their driver died; a store this user may only read is left as it is, with a warning."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        sweep_end.close_dead(client, [e.experiment_id for e in client.search_experiments()], "by zi-best")
    except (MlflowException, SQLAlchemyError) as error:
        if getattr(error, "error_code", None) == "UNAUTHENTICATED":
            raise  # no reading either: zi-best refuses the credentials in one line
        print(f"warning: could not close runs left RUNNING by a process that is gone: {type(error).__name__}",
              file=sys.stderr)


def unfinished(client, parent_run_id: str) -> Optional[str]:
    """Why the sweep of ``parent_run_id`` has not finished (still running, or stopped and how), or None."""
    parent = client.get_run(parent_run_id)
    if parent.info.status == "FINISHED":
        return None
    if parent.info.status == "RUNNING":
        return "still running"
    tags = parent.data.tags
    return tags.get(runs.FAILURE_MESSAGE_TAG) or f"its parent run is {parent.info.status}"


def sweep_owner(uri: str) -> Optional[str]:
    """Whose sweeps ``zi-best`` picks the latest of: on a tracking server, shared by a team, this user's (as
    MLflow names them in the ``mlflow.user`` tag); in a local store, anyone's."""
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.tracking.context.default_context import _get_user

    return _get_user()


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise InputError(f"--experiment {name!r}: no such experiment (there are: {names})")
    return experiment.experiment_id


def latest_sweep(client, experiment_name: str, user: Optional[str] = None) -> str:
    """The parent run of the most recently started sweep of ``experiment_name`` (of ``user``, if given)."""
    from mlflow.utils.mlflow_tags import MLFLOW_USER

    query = f"tags.`{runs.ROLE_TAG}` = 'sweep'"
    if user is not None:
        query += f" and tags.`{MLFLOW_USER}` = '{user.replace(chr(39), chr(92) + chr(39))}'"
    sweeps = client.search_runs([_experiment_id(client, experiment_name)], query,
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        whose = f" by {user}" if user is not None else ""
        raise InputError(f"no sweep{whose} in experiment '{experiment_name}' (run one with "
                         f"`{command('zi', 'zi_app')} -m ...`), or pass --experiment NAME or --parent RUN_ID")
    return sweeps[0].info.run_id


def select_rows(client, experiment_name: str, parent_prefix: Optional[str], every_sweep: bool = False,
                user: Optional[str] = None) -> Tuple[List[JobRow], str]:
    """The runs to rank (of the sweep whose parent run id starts with ``parent_prefix``, else every job of
    ``experiment_name`` with ``every_sweep``, else the latest sweep of that experiment, of ``user`` if given)
    and a description of where they come from: which sweep was picked, and whether it is unfinished."""
    if every_sweep:
        return (results.experiment_rows(client, [_experiment_id(client, experiment_name)]),
                f"experiment '{experiment_name}'")
    if parent_prefix:
        parent, picked = resolve_parent(client, parent_prefix), ""
    else:
        parent = latest_sweep(client, experiment_name, user)
        picked = f"the latest sweep of experiment '{experiment_name}'{f' by {user}' if user is not None else ''}, "
    why = unfinished(client, parent)
    scope = f"{picked}sweep {parent}" if why is None else f"{picked}UNFINISHED sweep {parent} ({why})"
    return results.child_rows(client, parent), scope


def resolve_parent(client, text: str) -> str:
    """The run id ``text`` names: a run's full id, or a prefix of exactly one sweep's parent run id (the
    shortened ids of the docs and of MLflow's UI)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(text).info.run_id
    except MlflowException:
        pass
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    sweeps = (store.search_runs(client, experiment_ids, f"tags.`{runs.ROLE_TAG}` = 'sweep'")
              if experiment_ids else [])
    matches = sorted(run.info.run_id for run in sweeps if run.info.run_id.startswith(text))
    if not matches:
        raise InputError(f"--parent {text!r}: no such run in this store, and no sweep's run id starts with it")
    if len(matches) > 1:
        raise InputError(f"--parent {text!r} is ambiguous: the run ids of {len(matches)} sweeps start with it "
                         f"({', '.join(matches[:5])}{', ...' if len(matches) > 5 else ''}); give more characters")
    return matches[0]


def ds_config_location(row: JobRow) -> str:
    """The run's ``ds_config.json``: a local path for a local artifact store, else its artifact URI."""
    parsed = urllib.parse.urlparse(row.artifact_uri)
    if parsed.scheme in ("", "file"):
        return str(Path(urllib.request.url2pathname(parsed.path)) / DS_CONFIG)
    return f"{row.artifact_uri.rstrip('/')}/{DS_CONFIG}"


def report(row: JobRow, metric: str) -> dict:
    """What the command prints about the chosen run, as plain values."""
    def gib(key: str) -> Optional[float]:
        return row.metrics[key] / results.GIB if key in row.metrics else None

    return {"run_id": row.run_id, "experiment_id": row.experiment_id, "overrides": row.overrides,
            results.METRIC: row.metrics.get(results.METRIC), metric: row.metrics.get(metric),
            "peak_gpu_allocated_gib": gib(results.GPU_ALLOCATED), "peak_gpu_reserved_gib": gib(results.GPU_RESERVED),
            "peak_host_gib": gib(results.HOST_RSS), "ds_config": ds_config_location(row)}


def as_text(info: dict, metric: str, header: str) -> str:
    def number(value: Optional[float], unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.2f}{unit}"

    gpu = ("n/a (no GPU metrics: a CPU run)" if info["peak_gpu_allocated_gib"] is None else
           f"{number(info['peak_gpu_allocated_gib'], ' GiB')} allocated, "
           f"{number(info['peak_gpu_reserved_gib'], ' GiB')} reserved")
    lines = [header, f"  run:             {info['run_id']}", f"  overrides:       {info['overrides'] or '(none)'}",
             f"  tokens/sec:      {number(info[results.METRIC])}"]
    if metric != results.METRIC:
        lines.append(f"  {metric + ':':<17}{info[metric]:.6g}")
    lines += [f"  peak GPU:        {gpu}", f"  peak host RSS:   {number(info['peak_host_gib'], ' GiB')}",
              f"  ds_config.json:  {info['ds_config']}"]
    return "\n".join(lines)


def next_steps(uri: str, experiment: str, experiment_id: str, run_id: str) -> List[str]:
    """What a single job says at its end: its run and store, and the commands to compare it with the other
    jobs of its experiment (``zi-best``) and to browse it (the MLflow UI), pasteable into any shell."""
    from zi_app.config.schema import TrackingSpec

    named = "" if experiment == TrackingSpec.experiment else f" --experiment {shlex.quote(experiment)}"
    ui = results.ui_command(uri)
    return [f"run {run_id} recorded in {redact_text(uri)}, experiment '{experiment}'",
            f"next: {command('zi-best', 'zi_app.zi_best')} --tracking-uri {redact_text(uri)}{named} --every-sweep "
            f"(the best job of the experiment)",
            "      " + (f"{ui} (the MLflow UI), then " if ui else "")
            + f"{results.run_url(uri, experiment_id, run_id)} (this run)"]
