"""The Hydra task: validate -> (dry run | run under ZeRO-3) -> MLflow. Thin on purpose."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from zi_app import interrupt, tracking
from zi_app.jobplan import plan_job, ready
from zi_app.paths import conf_dir
from zi_app.redaction import redact, redact_overrides
from zi_app.schema import ConfigError

log = logging.getLogger("zi_app")
EXIT_INVALID_CONFIG = 2


def _versions() -> dict:
    tags = {}
    for package in ("deepspeed", "torch", "transformers", "hydra-core", "mlflow"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "missing"
    return tags


def _device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def _overrides() -> str:
    """The job's overrides, secrets masked: they are stored as a tag and name the run."""
    try:
        return redact_overrides(" ".join(HydraConfig.get().overrides.task))
    except ValueError:
        return ""


def _launch_dir() -> Optional[str]:
    """Where the command was run: a relative store path starts there, also under ``hydra.job.chdir=true``."""
    try:
        return HydraConfig.get().runtime.cwd
    except ValueError:
        return None


def _output_dir() -> Optional[Path]:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def run_job(cfg: DictConfig) -> float:
    """Run one job end to end and return its tokens/sec; failures are recorded in MLflow, then raised."""
    # ZeRO-3 gathers and frees parameter buffers of many sizes every step; expandable segments keep the
    # caching allocator from stranding GiBs in fragments under a GPU budget. Must precede CUDA's first use.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from mlflow.tracking import MlflowClient  # here, not at import: --help and tab completion load this module

    uri = tracking.absolute_uri(cfg.tracking.uri, _launch_dir())
    experiment_id = tracking.open_experiment(uri, cfg.tracking.experiment)  # a bad store: refused before loading
    tracking.close_dead_runs(MlflowClient(uri), [experiment_id], "when a job started")
    import torch

    cuda = torch.cuda.is_available()
    raw = OmegaConf.to_container(cfg, resolve=True)
    out_dir = _output_dir()
    overrides = _overrides()
    tags = {**_versions(), "device": _device_name(cuda), tracking.OVERRIDES_TAG: overrides}
    run_name = tracking.run_name(overrides, fallback=cfg.model.name)
    with tracking.job_run(experiment_id, run_name, tracking.job_params(raw), tags,
                          run_id_file=out_dir / tracking.RUN_ID_FILE if out_dir else None) as run:
        plan = ready(cfg, cuda)
        cfg = plan.cfg
        # Predictions mean nothing where DeepSpeed's CPU accelerator keeps everything in host memory.
        predicted = plan.predicted_metrics() if cuda else {}
        tracking.log_metrics(predicted)
        if plan.residency.offload_needed is not None:
            tracking.log_tags({tracking.OFFLOAD_NEEDED_TAG: str(plan.residency.offload_needed).lower()})
        tracking.log_json(plan.ds_config, "ds_config.json")
        tracking.log_text(OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=True))), "config.yaml")

        if cfg.devices > 1:
            from zi_app import ranks

            # Its ranks' metrics reach the run from a thread of their own: name the run, not the thread's.
            result = ranks.run_ranks(cfg, plan.ds_config,
                                     on_metrics=functools.partial(tracking.log_metrics, run_id=run.info.run_id))
        else:
            from zi_app.runner import run_inference

            result = run_inference(cfg, plan.ds_config, on_metrics=tracking.log_metrics)
        tracking.log_json({"repeats": result.repeats, "generated_token_ids": result.output_ids}, "generation.json")
    log.info("result: %s", result_line(cfg, {**predicted, **result.metrics}, plan.residency.offload_needed))
    return result.metrics["tokens_per_sec"]


def result_line(cfg: DictConfig, m: dict, offload_needed: Optional[bool] = None) -> str:
    """One line with a job's headline numbers (a job of several devices: its ranks' count, the whole job's
    tokens/s, the largest rank's GPU peak); the GPU and roofline figures where they were measured, and
    whether the model would fit the GPU budget without offloading where that is known."""
    predicted = f" (predicted {m['predicted_tokens_per_sec']:.2f})" if "predicted_tokens_per_sec" in m else ""
    ranks = f" x {cfg.devices} devices" if cfg.devices > 1 else ""
    parts = [f"{cfg.model.name} batch={cfg.batch}{ranks} {m['tokens_per_sec']:.2f} tokens/s{predicted}",
             f"decode step {m.get('decode_step_s', float('nan')):.4f} s", f"prefill {m['prefill_s']:.3f} s",
             f"peak host {m['peak_host_rss_bytes'] / 2**30:.2f} GiB"]
    if "peak_gpu_allocated_bytes" in m:
        parts.append(f"peak GPU {m['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB{' (largest rank)' if ranks else ''} "
                     f"(predicted {m['predicted_peak_gpu_bytes'] / 2**30:.2f})")
    if "roofline_ratio" in m:
        parts.append(f"{m['roofline_ratio']:.2f}x the roofline ({m['streamed_bytes_per_step'] / 1e9:.2f} GB/step "
                     f"at {m['h2d_gbps']:.1f} GB/s)")
    if offload_needed is False:
        parts.append("offload not needed: every weight fits the GPU budget with offload=none")
    return ", ".join(parts)


def dry_run(cfg: DictConfig) -> None:
    """Print the DeepSpeed config of ``cfg`` as one JSON document on stdout; load nothing, log nothing.

    A config meant for another machine is still printed: what this machine lacks to run it goes to stderr,
    one ``warning:`` line per problem, naming the key.
    """
    import torch

    # The JSON must stand alone on stdout (`> ds_config.json`), but libraries imported while planning print
    # there (DeepSpeed's accelerator warning, through transformers, for real weights), directly or through
    # Hydra's console log handler.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_job(cfg, torch.cuda.is_available())
    for problem in plan.problems:
        print(f"warning: cannot run here: {problem}", file=sys.stderr)
    print(json.dumps(plan.ds_config, indent=2))


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """``python -m zi_app [overrides]``: one ZeRO-Inference job (``-m`` for a sweep).

    SIGINT, SIGTERM and SIGHUP close the job's run FAILED (kind ``killed``) and exit 128 + the signal.
    """
    interrupt.install()
    try:
        if cfg.dry_run:
            return dry_run(cfg)
        return run_job(cfg)
    except interrupt.Interrupted as stop:
        print(f"zi_app: {stop}; exit status {stop.code}", file=sys.stderr, flush=True)
        raise
    except (ConfigError, tracking.StoreError) as error:
        if _multirun():  # the launcher reports it, and the sweep records it as a failed run
            raise
        invalid = isinstance(error, ConfigError)
        print(f"error: {'invalid config: ' if invalid else ''}{error}", file=sys.stderr)
        sys.exit(EXIT_INVALID_CONFIG if invalid else tracking.EXIT_STORE_ERROR)


def cli() -> None:
    """``zi`` and ``python -m zi_app``: the Hydra app, with a usage error of Hydra's command line (``-m``
    with ``--info``, say) reported in one line and exit status 2 instead of a traceback."""
    try:
        main()
    except ValueError as error:  # a job's errors never get here: Hydra reports them and exits
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_INVALID_CONFIG)
