"""Refit the speed model's constants (``hardware.*_efficiency``, ``*_overhead_s``) to finished runs.

Takes the finished job runs of an MLflow experiment (read by the recording stage,
:func:`zi_app.record.runs.measured_runs`), keeps those that measured a decode step on the GPU the plan is for
(their ``device`` tag holds ``hardware.device_name``), re-plans each one's logged config to know its fetches
and compute, and fits (docs/planner.md):

- pinned runs limited by the link: ``decode_step_s - compute = streamed / (h2d_gbps * stream_efficiency)
  + fetches * fetch_overhead_s + quantized matrices * dequant_overhead_s + step_overhead_s``, least squares
  over the terms that vary between the runs (the others keep their current value);
- pageable runs: ``pageable_efficiency``, the median that reproduces their steps;
- compute-bound prefills: ``compute_efficiency``, the median that reproduces them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

from zi_app.config.schema import JobSpec
from zi_app.config.spec import validate
from zi_app.plan import speed
from zi_app.plan.facts import model_facts
from zi_app.plan.hardware import Hardware, hardware as machine_hardware
from zi_app.plan.workload import workload

MIN_RUNS = 3


class CalibrationError(RuntimeError):
    """Too few usable runs to refit the constants."""


@dataclass
class Calibration:
    """Fitted constants, how many runs each came from, and the runs' experiment."""

    constants: Dict[str, float]
    runs: Dict[str, int] = field(default_factory=dict)
    total: int = 0

    def overrides(self) -> List[str]:
        """The constants as overrides of the hardware group."""
        return [f"hardware.{key}={value:.6g}" for key, value in self.constants.items()]

    def describe(self) -> str:
        """One line per constant with the number of runs it was fitted to."""
        lines = [f"calibrated from {self.total} finished runs:"]
        lines += [f"  hardware.{key}={value:.6g}  (from {self.runs[key]} runs)" for key, value in self.constants.items()]
        return "\n".join(lines)


@dataclass
class _Run:
    work: object
    facts: object
    metrics: Dict[str, float]
    compute_s: float
    prefill_flops: float
    fetches: int
    quantized: int


@dataclass(frozen=True)
class MeasuredRun:
    """A finished job run as the store holds it: its logged ``config.yaml``, its metrics and its device tag."""

    config: Dict[str, Any]
    metrics: Dict[str, float]
    device: str


def _usable_runs(runs: Iterable[MeasuredRun], hardware: Hardware) -> List[_Run]:
    usable = []
    for run in runs:
        metrics = run.metrics
        if "decode_step_s" not in metrics or "h2d_gbps" not in metrics or "streamed_bytes_per_step" not in metrics \
                or hardware.device_name.lower() not in run.device.lower():
            continue
        spec = validate(run.config)
        if spec.devices > 1 or spec.quant.mode == "post":
            # The fit's terms are one rank's, without post-init quantization's own per-matrix cost.
            continue
        work, facts = workload(spec), model_facts(spec.model.arch)
        usable.append(_Run(work, facts, dict(metrics), speed.decode_compute_s(work, facts, hardware),
                           speed.prefill_flops(work, facts), speed.fetches_per_forward(work, facts),
                           speed.quantized_matrices(work, facts)))
    return usable


def fit(runs: List[_Run], hardware) -> Calibration:
    """The constants that best reproduce ``runs`` on ``hardware`` (whose current constants are the start)."""
    import numpy as np

    constants = {"stream_efficiency": hardware.stream_efficiency, "fetch_overhead_s": hardware.fetch_overhead_s,
                 "dequant_overhead_s": hardware.dequant_overhead_s, "step_overhead_s": hardware.step_overhead_s,
                 "pageable_efficiency": hardware.pageable_efficiency,
                 "compute_efficiency": hardware.compute_efficiency}
    counts = {key: 0 for key in constants}
    floor = lambda run: len(run.facts.param_numels) * hardware.param_overhead_s  # noqa: E731
    link = lambda run: run.metrics["streamed_bytes_per_step"] / (run.metrics["h2d_gbps"] * 1e9)  # noqa: E731
    pinned = [run for run in runs if run.work.pin and run.work.offload != "none" and link(run) > floor(run)]
    if len(pinned) >= MIN_RUNS:
        columns = {"stream_efficiency": [link(r) for r in pinned], "fetch_overhead_s": [r.fetches for r in pinned],
                   "dequant_overhead_s": [r.quantized for r in pinned], "step_overhead_s": [1.0] * len(pinned)}
        free = [key for key, values in columns.items() if len(set(values)) > 1 or key == "step_overhead_s"]
        target = np.array([r.metrics["decode_step_s"] - r.compute_s for r in pinned])
        for key in columns:
            if key not in free:
                target -= np.array(columns[key]) * (1 / constants[key] if key == "stream_efficiency" else constants[key])
        matrix = np.array([columns[key] for key in free], dtype=float).T
        solution = np.linalg.lstsq(matrix, target, rcond=None)[0]
        for key, value in zip(free, solution):
            if key == "stream_efficiency":
                constants[key] = float(min(1.0, 1 / value)) if value > 0 else constants[key]
            else:
                constants[key] = max(0.0, float(value))
            counts[key] = len(pinned)
    host = lambda run: (run.fetches * constants["fetch_overhead_s"] + run.quantized * constants["dequant_overhead_s"]  # noqa: E731
                        + constants["step_overhead_s"])
    pageable = [link(r) / (r.metrics["decode_step_s"] - r.compute_s - host(r)) for r in runs
                if not r.work.pin and r.work.offload != "none" and r.metrics["decode_step_s"] - r.compute_s - host(r) > 0]
    if pageable:
        constants["pageable_efficiency"] = min(1.0, statistics.median(pageable))
        counts["pageable_efficiency"] = len(pageable)
    peak = hardware.gpu_tflops * 1e12
    bound = [r.prefill_flops / (peak * (r.metrics["prefill_s"] - constants["step_overhead_s"])) for r in runs
             if "prefill_s" in r.metrics and r.metrics["prefill_s"] > constants["step_overhead_s"]
             and r.prefill_flops / (peak * constants["compute_efficiency"]) > link(r) + host(r)]
    if bound:
        constants["compute_efficiency"] = min(1.0, statistics.median(bound))
        counts["compute_efficiency"] = len(bound)
    fitted = {key: value for key, value in constants.items() if counts[key]}
    if not fitted:
        raise CalibrationError(f"{len(runs)} usable runs, none of a kind that fits a constant (at least {MIN_RUNS} "
                               f"pinned offloaded runs, or pageable or compute-bound ones)")
    return Calibration(fitted, {key: counts[key] for key in fitted}, len(runs))


def from_runs(spec: JobSpec, runs: Iterable[MeasuredRun], where: str,
              hardware: Optional[Hardware] = None) -> Calibration:
    """Fit the constants of ``spec``'s hardware (or ``hardware``) to ``runs``, the finished runs of ``where``
    (the store and experiment they were read from, for the error message)."""
    hardware = hardware or machine_hardware(spec)
    if not hardware.has_gpu_rates or not hardware.device_name:
        raise CalibrationError(f"hardware={hardware.name} has no GPU figures here; name the machine the runs "
                               f"ran on, e.g. hardware=h200")
    usable = _usable_runs(runs, hardware)
    if not usable:
        raise CalibrationError(f"no finished run on a {hardware.device_name} with a measured decode step in {where}")
    return fit(usable, hardware)
