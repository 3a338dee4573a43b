"""The best run of the latest sweep, of a given sweep, or of an experiment (``zi-best``, or
``python -m zi_app.zi_best``).

The latest sweep is the latest of one experiment (``--experiment``, default the app's ``zero-inference``)
and, on a tracking server, the latest of this user's sweeps (MLflow's ``mlflow.user`` tag); the output says
which sweep it picked.

Prints the run's overrides, tokens/sec (or ``--metric``), peak GPU and host memory and where its
``ds_config.json`` is; ``--max-peak-gpu-gib`` / ``--max-peak-host-gib`` pick the best run that stays
under a memory cap. Runs left RUNNING by a process that is gone are closed first (FAILED, kind
``killed``), and a sweep that did not finish is said to be unfinished. Exit status: 0 found, 1 no run
qualifies, 2 bad input (unknown, unreachable or broken store, unknown run or experiment, credentials the tracking
server refuses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from zi_app.config.schema import TrackingSpec
from zi_app.record import results
from zi_app.record.best import InputError, as_text, close_dead_runs, open_store, report, select_rows, sweep_owner
from zi_app.record.store import access_refused

EXIT_NONE_QUALIFIES = 1
EXIT_BAD_INPUT = 2


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a positive number of GiB")
    return value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    prog = "zi-best" if Path(sys.argv[0]).name == "zi-best" else "python -m zi_app.zi_best"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=TrackingSpec.uri,
                        help="MLflow store or server (default: %(default)s, relative to the current directory)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--parent", metavar="RUN_ID",
                       help="the parent run of a sweep, or a unique prefix of its id (default: the latest sweep "
                            "of --experiment; on a tracking server, the latest of this user's)")
    scope.add_argument("--experiment", metavar="NAME",
                       help=f"the experiment whose latest sweep to rank (default: {TrackingSpec.experiment})")
    parser.add_argument("--every-sweep", action="store_true",
                        help="rank every job run of --experiment, any sweep, anyone's")
    parser.add_argument("--metric", default=results.METRIC, help="metric to rank by (default: %(default)s)")
    parser.add_argument("--minimize", action="store_true", help="lower is better (e.g. --metric latency_s)")
    parser.add_argument("--max-peak-gpu-gib", type=_positive, metavar="GIB",
                        help="only runs whose peak reserved GPU memory is at most this")
    parser.add_argument("--max-peak-host-gib", type=_positive, metavar="GIB",
                        help="only runs whose peak host RSS is at most this")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    if args.every_sweep and args.parent:
        parser.error("argument --every-sweep: not allowed with argument --parent (one sweep)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns its exit status."""
    args = parse_args(argv)
    try:
        client = open_store(args.tracking_uri)
        close_dead_runs(client)
        rows, scope = select_rows(client, args.experiment or TrackingSpec.experiment, args.parent,
                                  args.every_sweep, sweep_owner(args.tracking_uri))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # noqa: BLE001 - a server refusing this user: one line; anything else as is
        refused = access_refused(error, args.tracking_uri)
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ranked = results.rank(rows, args.metric, args.minimize, args.max_peak_gpu_gib, args.max_peak_host_gib)
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
    print(json.dumps({**info, "ranked": scope}, indent=2) if args.json else as_text(info, args.metric, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
