"""The adaptive sweeper's work: plan every point of the grid, launch the points predicted fastest, then the
measured best's neighbours, round after round, until the measured best is confirmed: all its neighbours
that fit were measured and none was faster.

A point's neighbours differ from it in one swept key, by one step in the order the values were listed
(``batch=1,8,32,64``: 8's neighbours are 1 and 32). Points the planner refuses are never launched. Jobs
return tokens/s (``zi_app.app.main``); a failed job counts as measured and not faster.

Without a speed prediction (``hardware=auto`` on a CPU, or a GPU no preset knows) the largest batch that fits
runs first, a point's neighbours along ``batch`` are found by bisection (the middle of the batch sizes between it
and the nearest measured one), and at most half the grid is measured.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.zero_inference._sweep_plan import outcome
from zi_app.config.checks import EXIT_INVALID_CONFIG

REPORT_ARTIFACT = "adaptive_sweep.txt"  # the end-of-sweep report, on the sweep's parent run


@dataclass
class Point:
    """One point of the grid: its position, its overrides, the planner's verdict and what it measured."""

    position: Tuple[int, ...]  # index of its value in each override's list of values
    overrides: List[str]  # every override of the job, fixed and swept, in command-line order
    label: str  # the swept keys' values, ``batch=8 pin=true``
    fits: bool = False
    reason: str = ""  # why it does not fit; empty when it does
    predicted: Optional[float] = None  # predicted tokens/s; None when the hardware's rates are unknown
    launched: bool = False
    measured: Optional[float] = None  # tokens/s of a completed job
    failure: str = ""  # a launched job's failure


@dataclass
class Grid:
    """The sweep's points, planned. ``bisect_axis``: the swept ``batch``'s axis when no speed is predicted, along
    which a point's neighbours are the middles of the stretches not measured yet (:meth:`neighbours`).
    ``predicted_faster``: the sweeper's ``measure_predicted_faster`` (see :func:`next_round`)."""

    points: Dict[Tuple[int, ...], Point]
    bisect_axis: Optional[int] = None
    predicted_faster: bool = False

    def neighbours(self, point: Point) -> List[Point]:
        """The points one step away from ``point`` along one swept key (a fixed one has no other value); along
        ``bisect_axis``, the middle fitting point between ``point`` and the nearest launched one (or the end)."""
        found = []
        for axis in range(len(point.position)):
            if axis == self.bisect_axis:
                found += self._bisected(point, axis)
                continue
            for step in (-1, 1):
                position = list(point.position)
                position[axis] += step
                if tuple(position) in self.points:
                    found.append(self.points[tuple(position)])
        return found

    def _bisected(self, point: Point, axis: int) -> List[Point]:
        """Along ``axis``, on each side of ``point``: the middle of the fitting points up to the nearest
        launched one, so that a climb over n batch sizes measures about log2(n) of them."""
        line = [p for p in self.points.values() if p.fits and
                all(p.position[a] == point.position[a] for a in range(len(point.position)) if a != axis)]
        line.sort(key=lambda p: p.position[axis])
        here = line.index(point) if point in line else None
        if here is None:
            return []
        found = []
        for side in (line[:here][::-1], line[here + 1:]):  # nearest first
            stretch = list(itertools.takewhile(lambda p: not p.launched, side))
            if stretch:
                found.append(stretch[len(stretch) // 2])
        return found

    def by_prediction(self) -> List[Point]:
        """The points that fit, predicted fastest first; those without a prediction last, in grid order."""
        return order(p for p in self.points.values() if p.fits)

    def best(self) -> Optional[Point]:
        """The measured fastest point, or None before any job completed."""
        measured = [p for p in self.points.values() if p.measured is not None]
        return max(measured, key=lambda p: p.measured) if measured else None

    def predicted_above(self, tokens_per_sec: float) -> List[Point]:
        """The points that fit, were not launched and are predicted faster than ``tokens_per_sec``, fastest first."""
        return [p for p in self.by_prediction()
                if not p.launched and p.predicted is not None and p.predicted > tokens_per_sec]

    def pending_neighbours(self, point: Point) -> List[Point]:
        """``point``'s neighbours that fit and were not launched, predicted fastest first."""
        return order(p for p in self.neighbours(point) if p.fits and not p.launched)


def batch_of(point: Point) -> int:
    """The job's ``batch`` (0 when not given)."""
    for item in reversed(point.overrides):
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "batch" and value.isdigit():
            return int(value)
    return 0


def order(points: Iterable[Point]) -> List[Point]:
    """``points`` predicted fastest first; those without a prediction last, the largest batch first (a decode
    step streams the same weights for any batch, so tokens/s grows with the batch while it fits); grid order
    among equals."""
    return sorted(points, key=lambda p: (p.predicted is None, -(p.predicted or 0.0), -batch_of(p)))


def parse_grid(sweeper: Any, arguments: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Every override as (key, its values), parsed as the basic sweeper does, in command-line order: one
    value for a fixed override, the listed ones for a swept key."""
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    axes = []
    for override in parser.parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()] + list(arguments)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes.append((key, [override.get_value_element_as_str()]))
        elif override.is_discrete_sweep():
            axes.append((key, list(override.sweep_string_iterator())))
        else:
            raise HydraException(f"the adaptive sweeper takes lists, range() and choice() of values, not "
                                 f"{override.value_type.name} sweeps ({override.input_line})")
    return axes


def plan_point(sweeper: Any, point: Point, cuda: bool) -> None:
    """Plan ``point`` without loading anything: whether it fits here and why not, and its predicted tokens/s."""
    from zi_app.config.checks import ConfigError
    from zi_app.config.spec import validate
    from zi_app.plan.job import plan_job

    config = sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, list(point.overrides))
    try:
        plan = plan_job(validate(config), cuda)
    except ConfigError as error:
        point.reason = f"invalid config: {error}"
        return
    point.fits, point.reason, point.predicted = plan.fits, plan.reason, plan.predicted_tokens_per_sec


def plan_grid(sweeper: Any, arguments: Sequence[str]) -> Grid:
    """Every point of the grid, planned."""
    import torch

    axes = parse_grid(sweeper, arguments)
    cuda = torch.cuda.is_available()
    points = {}
    for position in itertools.product(*(range(len(values)) for _, values in axes)):
        chosen = [f"{key}={values[i]}" for (key, values), i in zip(axes, position)]
        label = " ".join(item for item, (_, values) in zip(chosen, axes) if len(values) > 1)
        point = Point(position, chosen, label or " ".join(chosen) or "(no overrides)")
        plan_point(sweeper, point, cuda)
        points[position] = point
    guessed = any(p.predicted is not None for p in points.values())
    batch_axis = [i for i, (key, values) in enumerate(axes) if key.lstrip("+~") == "batch" and len(values) > 2]
    return Grid(points, bisect_axis=None if guessed or not batch_axis else batch_axis[0],
                predicted_faster=sweeper.measure_predicted_faster)


def next_round(grid: Grid, size: int) -> List[Point]:
    """The next jobs: the best's unmeasured neighbours once a job completed, else the most promising
    points not launched yet; empty once the best is confirmed or nothing is left. With ``grid.predicted_faster``, a best
    whose neighbours are all measured is confirmed only once no point the planner predicts faster than its
    measured tokens/s is left; until then those points come next, predicted fastest first."""
    best = grid.best()
    if best is None:
        return [p for p in grid.by_prediction() if not p.launched][:size]
    todo = grid.pending_neighbours(best)
    if not todo and grid.predicted_faster:
        todo = grid.predicted_above(best.measured)
    return todo[:size]


def round_reason(grid: Grid, batch: List[Point], first: str) -> str:
    """Why ``batch`` is the next round: ``first`` (how the first round is chosen), the best's neighbours, or
    points predicted faster than the best (``measure_predicted_faster``)."""
    best = grid.best()
    if best is None:
        return first
    if all(p in grid.neighbours(best) for p in batch):
        return f"neighbours of the best so far, {best.label}"
    return f"predicted faster than the best so far, {best.label}: {best.measured:.2f} tokens/s"


def record(point: Point, ret: JobReturn) -> None:
    """Keep what a finished job measured, or why it failed."""
    value = ret._return_value  # the public property raises for a failed job
    if ret.status == JobStatus.COMPLETED and isinstance(value, (int, float)) and not isinstance(value, bool):
        point.measured = float(value)
    elif ret.status == JobStatus.COMPLETED:
        point.failure = f"returned {value!r}, not tokens/s"
    else:
        point.failure = outcome(ret, "tokens/s").removeprefix("FAILED ")


def predicted(point: Point) -> str:
    """`` (predicted 12.34 tokens/s)``, or nothing when the speed was not predicted."""
    return f" (predicted {point.predicted:.2f} tokens/s)" if point.predicted is not None else ""


def report(grid: Grid, stopped_early: Optional[str]) -> str:
    """Which points were measured, which were skipped and why (``stopped_early``: why the sweep stopped
    before the best was confirmed, if it did), and the best."""
    best = grid.best()
    measured = [p for p in grid.points.values() if p.launched]
    unfit = [p for p in grid.points.values() if not p.fits]
    unneeded = [p for p in grid.by_prediction() if not p.launched]
    lines = ["", f"Adaptive sweep: {len(measured)} of {len(grid.points)} points measured, {len(unfit)} do not fit, "
                 f"{len(unneeded)} not needed"]
    if measured:
        lines += ["Measured:"] + [f"  {p.label}: " + (f"{p.measured:.2f} tokens/s" if p.measured is not None
                                                       else f"FAILED {p.failure}") + predicted(p) for p in measured]
    if unfit:
        lines += ["Skipped, the planner refuses them:"] + [f"  {p.label}: {p.reason}" for p in unfit]
    if unneeded:
        why = stopped_early or ("not a neighbour of the confirmed best"
                                + (" and predicted slower than it" if grid.predicted_faster else ""))
        lines += [f"Skipped, {why}:"] + [f"  {p.label}{predicted(p)}" for p in unneeded]
    if best is None:
        lines.append("Best: none, no job completed")
    else:
        state = (f"not confirmed: {stopped_early} before all its neighbours ran" if stopped_early
                 else "confirmed: no neighbour in the grid is faster"
                 + (", and no point predicted faster is left" if grid.predicted_faster else ""))
        lines.append(f"Best: {best.label}: {best.measured:.2f} tokens/s ({state})")
    return "\n".join(lines)


def _check_options(sweeper: Any) -> None:
    from zi_app.config.checks import ConfigError

    for key, value, allowed in (("max_jobs", sweeper.max_jobs, "null or a positive integer"),
                                ("jobs_per_round", sweeper.jobs_per_round, "a positive integer")):
        if (value is not None or key == "jobs_per_round") and (not isinstance(value, int) or value < 1):
            print(f"error: invalid config: {ConfigError(f'hydra.sweeper.{key}', value, allowed)}", file=sys.stderr)
            sys.exit(EXIT_INVALID_CONFIG)


def _log_report(config: DictConfig, text: str) -> None:
    """Attach the report to the sweep's parent run (opened by the sweep callback, sweep_callback.py)."""
    from mlflow.tracking import MlflowClient

    from zi_app.record import runs, store

    parent = os.environ.get(runs.PARENT_RUN_ENV)
    if parent and not config.dry_run:
        MlflowClient(store.absolute_uri(config.tracking.uri)).log_text(parent, text + "\n", REPORT_ARTIFACT)


def sweep(sweeper: Any, arguments: List[str]) -> List[Sequence[JobReturn]]:
    """Plan the grid, launch round after round until the best is confirmed, print the report; return
    the JobReturns of every round."""
    _check_options(sweeper)
    config = sweeper.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    grid = plan_grid(sweeper, arguments)
    fit = grid.by_prediction()
    guessed = any(p.predicted is not None for p in fit)
    first = "predicted fastest" if guessed else "largest batch first"
    print(f"Adaptive sweep: {len(grid.points)} points planned, {len(fit)} fit; {first}: "
          + ", ".join(p.label + predicted(p) for p in fit[:4]) + (", ..." if len(fit) > 4 else ""), flush=True)
    if grid.predicted_faster and guessed:
        print("Adaptive sweep: measure_predicted_faster: a best is confirmed once its neighbours and every point "
              "predicted faster than it are measured", flush=True)
    limit = sweeper.max_jobs if sweeper.max_jobs is not None else len(grid.points)
    if fit and not guessed:
        # Without a prediction the climb has nothing to skip by: at most half the grid is measured.
        limit = min(limit, max(1, len(grid.points) // 2))
        along = ", then bisecting the batch sizes" if grid.bisect_axis is not None else ""
        print(f"Adaptive sweep: no speed predicted (hardware=auto without a GPU, or a GPU no preset knows: set the "
              f"hardware.* rates), so it starts from the largest batch{along}, and measures at most {limit} of "
              f"{len(grid.points)} points", flush=True)
    returns: List[Sequence[JobReturn]] = []
    launched = 0
    while True:
        batch = next_round(grid, min(sweeper.jobs_per_round, limit - launched))
        if not batch:
            break
        print(f"Adaptive sweep, round {len(returns) + 1}: " + ", ".join(p.label for p in batch)
              + f" ({round_reason(grid, batch, first)})", flush=True)
        if hasattr(sweeper.launcher, "batch_name"):  # the launcher's time plan covers this round, not the sweep
            sweeper.launcher.batch_name = f"round {len(returns) + 1}"
        results = sweeper.launcher.launch([p.overrides for p in batch], initial_job_idx=launched)
        for point, ret in zip(batch, results):
            point.launched = True
            record(point, ret)
        launched += len(batch)
        returns.append(results)
    best = grid.best()
    stopped_early = None
    if next_round(grid, 1):  # the loop ended at its limit with work left
        stopped_early = ("max_jobs reached" if limit == sweeper.max_jobs else
                         "half the grid measured, no speed predicted")
    text = report(grid, stopped_early)
    print(text, flush=True)
    _log_report(config, text)
    if best is None:
        raise NothingMeasured("the adaptive sweep measured no point: " + (
            "none fits (see above)" if not fit else "every job it launched failed (see above)"),
            EXIT_INVALID_CONFIG if not fit else 1)
    return returns


class NothingMeasured(CompactHydraException):
    """An adaptive sweep that ended without a measurement: the app's entry point prints it as one ``error:`` line
    (the report above names each point's refusal or failure) and exits with ``exit_status``: 2 when the planner
    refused every point, as for a bad value, 1 when every launched job failed."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
