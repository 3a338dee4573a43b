"""``zi-plan`` / ``python -m zi_app.zi_plan [overrides]``: predict jobs before running them.

Takes the app's overrides, comma lists included (expanded by Hydra's own sweep machinery, as ``-m`` would),
validates and plans every point (:func:`zi_app.plan.job.plan_job`) (no model loaded, no GPU needed) and prints one row
per point: whether it fits the hardware it is planned for and why not, the devices (ranks) it spans,
predicted peak GPU memory per rank, peak host RSS of the job, bytes each rank streams over its host link and
all-gathers from its peers per decode step, decode step seconds and tokens/s, the predicted best marked.
``--json`` prints one JSON array instead; ``--calibrate`` first refits the speed model's constants to the
finished runs of the MLflow store (docs/planner.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from zi_app.config.checks import EXIT_INVALID_CONFIG, ConfigError
from zi_app.config.paths import conf_dir
from zi_app.config.schema import JobSpec
from zi_app.config.spec import check_task, composition_error, validate

GIB = 2**30
KEYS = ("overrides", "fits", "reason", "devices", "predicted_peak_gpu_bytes", "predicted_peak_host_bytes",
        "predicted_nvme_bytes", "predicted_streamed_bytes_per_step", "predicted_peer_bytes_per_step",
        "predicted_decode_step_s", "predicted_prefill_s", "predicted_tokens_per_sec", "pytorch_dequantization",
        "kv_gpu_layers")


def points(overrides: Sequence[str]) -> List[List[str]]:
    """Every point of the grid the overrides describe (comma lists and sweep functions), as Hydra's basic
    sweeper would launch them: one list of overrides per job."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def composed(point: Sequence[str]) -> Any:
    """The point's config as ``zi`` would compose it, or :class:`ConfigError` for a bad override: one Hydra
    cannot compose (``batch=abc``, ``model=nope``, ``foo=1``) or one ``zi`` refuses before validating
    (:func:`zi_app.config.spec.check_task`: ``+bacth=8``, ``profile_step=2``)."""
    try:
        cfg = compose("config", overrides=list(point))
    except HydraException as error:
        refused = composition_error(error, point)
        if refused is None:
            raise
        raise refused from None
    check_task(cfg, point)
    return cfg


def plan_point(point: Sequence[str], cfg: Any, cuda: bool) -> Dict[str, Any]:
    """One point's row: its overrides, whether it fits and why not, and its predictions (None: unknown).

    A preset (``hardware=h200``) is planned for that machine; ``hardware=auto`` for this one, with what it
    lacks included. A config (``cfg``, the point composed) invalid as configuration does not fit, with the
    error as its reason.
    """
    from zi_app.plan.job import plan_job

    row: Dict[str, Any] = {key: None for key in KEYS}
    row["overrides"] = " ".join(point)
    try:
        spec = validate(cfg)
        plan = plan_job(spec, cuda, here=spec.hardware.name == "auto")
    except (ConfigError, OmegaConfBaseException) as error:
        row.update(fits=False, reason=f"invalid config: {error}".splitlines()[0])
        return row
    row.update(fits=plan.fits, reason=plan.reason, hardware=plan.hardware.name, devices=plan.spec.devices,
               predicted_peak_gpu_bytes=plan.predicted_peak_gpu_bytes,
               predicted_peak_host_bytes=plan.predicted_peak_host_bytes,
               predicted_nvme_bytes=plan.predicted_nvme_bytes,
               predicted_streamed_bytes_per_step=plan.predicted_streamed_bytes_per_step,
               predicted_peer_bytes_per_step=plan.predicted_peer_bytes_per_step,
               predicted_decode_step_s=plan.predicted_decode_step_s, predicted_prefill_s=plan.predicted_prefill_s,
               predicted_tokens_per_sec=plan.predicted_tokens_per_sec,
               pytorch_dequantization=plan.prediction.pytorch_dequantization,
               kv_gpu_layers=int(plan.spec.kvcache.gpu_layers))
    return row


def best(rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The fitting point with the highest predicted tokens/s, or None."""
    speeds = [row for row in rows if row["fits"] and row["predicted_tokens_per_sec"] is not None]
    return max(speeds, key=lambda row: row["predicted_tokens_per_sec"]) if speeds else None


def _cell(value: Optional[float], scale: float, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value / scale)


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as aligned text, in grid order, the predicted best marked; reasons below the table."""
    top = best(rows)
    # The disk NVMe offload needs, where a point swaps weights to it (a preset knows no disk: compare it with yours).
    nvme = any(row["predicted_nvme_bytes"] for row in rows)
    kept = any(row["kv_gpu_layers"] for row in rows)  # layers whose offloaded cache stays on the GPU
    header = ["", "overrides", "fits", "devices", "peak GPU GiB", "peak host GiB", *(["NVMe GiB"] if nvme else []),
              *(["KV GPU layers"] if kept else []),
              "streamed GB/step", "peer GB/step", "decode step s", "prefill s", "tokens/s"]
    body = [["best" if row is top else "", row["overrides"] or "(none)", "yes" if row["fits"] else "NO",
             _cell(row["devices"], 1, "{:.0f}"),
             _cell(row["predicted_peak_gpu_bytes"], GIB, "{:.2f}"), _cell(row["predicted_peak_host_bytes"], GIB, "{:.2f}"),
             *([_cell(row["predicted_nvme_bytes"], GIB, "{:.2f}")] if nvme else []),
             *([_cell(row["kv_gpu_layers"], 1, "{:.0f}")] if kept else []),
             _cell(row["predicted_streamed_bytes_per_step"], 1e9, "{:.2f}"),
             _cell(row["predicted_peer_bytes_per_step"], 1e9, "{:.2f}"),
             _cell(row["predicted_decode_step_s"], 1, "{:.4f}"), _cell(row["predicted_prefill_s"], 1, "{:.3f}"),
             _cell(row["predicted_tokens_per_sec"], 1, "{:.2f}")] for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"  {row['overrides'] or '(none)'}: {row['reason']}" for row in rows if not row["fits"]]
    if any(row["pytorch_dequantization"] for row in rows):
        lines.append("quantized weights in a dtype other than float16: DeepSpeed dequantizes them with separate "
                     "PyTorch kernels (its dequantization kernel is float16-only), every streamed weight every "
                     "step, which the speed predicted here counts (BLOOM-176B int4 batch 12, every weight streamed: a "
                     "decode step 1.85x its roofline in bfloat16, 1.05x in float16); model.dtype=float16 takes the "
                     "kernel")
    if any(row["predicted_peak_gpu_bytes"] is not None and row["predicted_tokens_per_sec"] is None for row in rows):
        lines.append("no speed predicted: hardware=auto on a machine without a GPU (or a GPU no preset knows); "
                     "plan for a preset (hardware=h200, h100-80gb, a100-80gb, l40s, ...: conf/hardware) or set "
                     "hardware.gpu_tflops, hardware.gpu_memory_gbps and the hardware.h2d_* figures")
    return "\n".join(lines)


def _calibrate(spec: JobSpec):
    """The speed model's constants refitted to the finished runs of ``spec.tracking``'s store and experiment."""
    from zi_app.plan import calibrate
    from zi_app.record import runs, store

    uri = store.absolute_uri(spec.tracking.uri)
    return calibrate.from_runs(spec, runs.measured_runs(uri, spec.tracking.experiment),
                               f"experiment {spec.tracking.experiment!r} of {spec.tracking.uri}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line, plan every point, print the table (or JSON); 2 for bad overrides."""
    parser = argparse.ArgumentParser(prog="zi-plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the app's overrides, e.g. model=opt-30b batch=1,8,24 pin=true,false")
    parser.add_argument("--json", action="store_true", help="print one JSON array, one object per point")
    parser.add_argument("--calibrate", action="store_true",
                        help="refit the speed model's constants to the finished runs in the MLflow store "
                             "(tracking.uri) first, and plan with them")
    args = parser.parse_args(argv)
    try:
        grid = points(args.overrides)
    except HydraException as error:
        print(f"error: invalid override: {error}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    import torch

    cuda = torch.cuda.is_available()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        if args.calibrate:
            from zi_app.plan.calibrate import CalibrationError

            try:
                fitted = _calibrate(validate(compose("config", overrides=grid[0])))
            except (ConfigError, LookupError, CalibrationError) as error:
                print(f"error: cannot calibrate: {error}", file=sys.stderr)
                return EXIT_INVALID_CONFIG
            print(fitted.describe(), file=sys.stderr)
            grid = [point + fitted.overrides() for point in grid]
        try:
            configs = [composed(point) for point in grid]
        except ConfigError as error:
            print(f"error: invalid override: {error}", file=sys.stderr)
            return EXIT_INVALID_CONFIG
        rows = [plan_point(point, cfg, cuda) for point, cfg in zip(grid, configs)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    return 0


def console_main() -> None:
    """Entry point of the ``zi-plan`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
