"""The best run of the latest sweep, of a given sweep, or of an experiment (``zi-best``, or
``python -m zi_app.best``).

Prints the run's overrides, tokens/sec (or ``--metric``), peak GPU and host memory and where its
``ds_config.json`` is; ``--max-peak-gpu-gib`` / ``--max-peak-host-gib`` pick the best run that stays
under a memory cap. Runs left RUNNING by a process that is gone are closed first (FAILED, kind
``killed``), and a sweep that did not finish is said to be unfinished. Exit status: 0 found, 1 no run
qualifies, 2 bad input (unknown, unreachable or broken store, unknown run or experiment).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from zi_app import sweep, tracking
from zi_app.schema import TrackingConfig

EXIT_NONE_QUALIFIES = 1
EXIT_BAD_INPUT = 2
DS_CONFIG = "ds_config.json"


class InputError(Exception):
    """A store, run or experiment that does not exist; the message says which and what to do."""


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a positive number of GiB")
    return value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    prog = "zi-best" if Path(sys.argv[0]).name == "zi-best" else "python -m zi_app.best"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=TrackingConfig.uri,
                        help="MLflow store or server (default: %(default)s, relative to the current directory)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--parent", metavar="RUN_ID",
                       help="the parent run of a sweep, or a unique prefix of its id (default: the latest sweep)")
    scope.add_argument("--experiment", metavar="NAME", help="rank every job run of this experiment, any sweep")
    parser.add_argument("--metric", default=sweep.METRIC, help="metric to rank by (default: %(default)s)")
    parser.add_argument("--minimize", action="store_true", help="lower is better (e.g. --metric latency_s)")
    parser.add_argument("--max-peak-gpu-gib", type=_positive, metavar="GIB",
                        help="only runs whose peak reserved GPU memory is at most this")
    parser.add_argument("--max-peak-host-gib", type=_positive, metavar="GIB",
                        help="only runs whose peak host RSS is at most this")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser.parse_args(argv)


def open_store(uri: str):
    """An MlflowClient on ``uri``, after the store's check (:func:`tracking.check_store`, reading only);
    a local SQLite store must already exist (never create an empty one)."""
    from mlflow.tracking import MlflowClient

    uri = tracking.absolute_uri(uri)
    if uri.startswith(tracking.SQLITE_PREFIX) and not Path(uri[len(tracking.SQLITE_PREFIX):]).is_file():
        raise InputError(f"--tracking-uri {uri}: no MLflow store there; run from the directory the sweep ran in, "
                         f"or pass --tracking-uri")
    try:
        tracking.check_store(uri, write=False)
    except tracking.StoreError as error:
        raise InputError(str(error)) from None
    return MlflowClient(uri)


def close_dead_runs(client) -> None:
    """Close the runs whose process is gone, so that none is counted as running; a store this user may
    only read is left as it is, with a warning."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        tracking.close_dead_runs(client, [e.experiment_id for e in client.search_experiments()], "by zi_app.best")
    except (MlflowException, SQLAlchemyError) as error:
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
    return tags.get(tracking.FAILURE_MESSAGE_TAG) or f"its parent run is {parent.info.status}"


def latest_sweep(client) -> str:
    """The parent run of the most recently started sweep in the store."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, f"tags.`{tracking.ROLE_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiment_ids else []
    if not runs:
        raise InputError("no sweep in this store (run one with `python -m zi_app -m ...`), or pass --experiment")
    return runs[0].info.run_id


def select_rows(client, args: argparse.Namespace) -> Tuple[List[sweep.JobRow], str]:
    """The runs to rank and a description of where they come from (saying so when a sweep is unfinished)."""
    if args.experiment:
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise InputError(f"--experiment {args.experiment!r}: no such experiment (there are: {names})")
        return sweep.experiment_rows(client, [experiment.experiment_id]), f"experiment '{args.experiment}'"
    parent = resolve_parent(client, args.parent) if args.parent else latest_sweep(client)
    why = unfinished(client, parent)
    scope = f"sweep {parent}" if why is None else f"UNFINISHED sweep {parent} ({why})"
    return sweep.child_rows(client, parent), scope


def resolve_parent(client, text: str) -> str:
    """The run id ``text`` names: a run's full id, or a prefix of exactly one sweep's parent run id (the
    shortened ids of the docs and of MLflow's UI)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(text).info.run_id
    except MlflowException:
        pass
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    sweep_filter = f"tags.`{tracking.ROLE_TAG}` = 'sweep'"
    sweeps = tracking.search_runs(client, experiment_ids, sweep_filter) if experiment_ids else []
    matches = sorted(run.info.run_id for run in sweeps if run.info.run_id.startswith(text))
    if not matches:
        raise InputError(f"--parent {text!r}: no such run in this store, and no sweep's run id starts with it")
    if len(matches) > 1:
        raise InputError(f"--parent {text!r} is ambiguous: the run ids of {len(matches)} sweeps start with it "
                         f"({', '.join(matches[:5])}{', ...' if len(matches) > 5 else ''}); give more characters")
    return matches[0]


def ds_config_location(row: sweep.JobRow) -> str:
    """The run's ``ds_config.json``: a local path for a local artifact store, else its artifact URI."""
    parsed = urllib.parse.urlparse(row.artifact_uri)
    if parsed.scheme in ("", "file"):
        return str(Path(urllib.request.url2pathname(parsed.path)) / DS_CONFIG)
    return f"{row.artifact_uri.rstrip('/')}/{DS_CONFIG}"


def report(row: sweep.JobRow, metric: str) -> dict:
    """What the command prints about the chosen run, as plain values."""
    def gib(key: str) -> Optional[float]:
        return row.metrics[key] / sweep.GIB if key in row.metrics else None

    return {"run_id": row.run_id, "experiment_id": row.experiment_id, "overrides": row.overrides,
            sweep.METRIC: row.metrics.get(sweep.METRIC), metric: row.metrics.get(metric),
            "peak_gpu_allocated_gib": gib(sweep.GPU_ALLOCATED), "peak_gpu_reserved_gib": gib(sweep.GPU_RESERVED),
            "peak_host_gib": gib(sweep.HOST_RSS), "ds_config": ds_config_location(row)}


def _text(info: dict, metric: str, header: str) -> str:
    def number(value: Optional[float], unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.2f}{unit}"

    gpu = ("n/a (no GPU metrics: a CPU run)" if info["peak_gpu_allocated_gib"] is None else
           f"{number(info['peak_gpu_allocated_gib'], ' GiB')} allocated, "
           f"{number(info['peak_gpu_reserved_gib'], ' GiB')} reserved")
    lines = [header, f"  run:             {info['run_id']}", f"  overrides:       {info['overrides'] or '(none)'}",
             f"  tokens/sec:      {number(info[sweep.METRIC])}"]
    if metric != sweep.METRIC:
        lines.append(f"  {metric + ':':<17}{info[metric]:.6g}")
    lines += [f"  peak GPU:        {gpu}", f"  peak host RSS:   {number(info['peak_host_gib'], ' GiB')}",
              f"  ds_config.json:  {info['ds_config']}"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns its exit status."""
    args = parse_args(argv)
    try:
        client = open_store(args.tracking_uri)
        close_dead_runs(client)
        rows, scope = select_rows(client, args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ranked = sweep.rank(rows, args.metric, args.minimize, args.max_peak_gpu_gib, args.max_peak_host_gib)
    caps = [f"{name} <= {cap:g} GiB" for name, cap in (("peak reserved GPU", args.max_peak_gpu_gib),
                                                        ("peak host RSS", args.max_peak_host_gib)) if cap]
    within = f" with {' and '.join(caps)}" if caps else ""
    if not ranked:
        completed = sum(row.completed for row in rows)
        print(f"error: no completed run with metric {args.metric}{within} among the {len(rows)} runs of {scope} "
              f"({completed} completed)", file=sys.stderr)
        return EXIT_NONE_QUALIFIES
    info = report(ranked[0], args.metric)
    failed = sum(not row.completed for row in rows)
    direction = "lowest" if args.minimize else "highest"
    header = (f"Best run of {scope} ({len(rows)} runs, {failed} failed): {direction} {args.metric}{within}")
    print(json.dumps({**info, "ranked": scope}, indent=2) if args.json else _text(info, args.metric, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
