"""The Hydra task: validate -> (dry run | run under ZeRO-3) -> MLflow. Thin on purpose."""

from __future__ import annotations

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

from zi_app import tracking
from zi_app.jobplan import ready
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
    import torch

    cuda = torch.cuda.is_available()
    raw = OmegaConf.to_container(cfg, resolve=True)
    experiment_id = tracking.open_experiment(tracking.absolute_uri(cfg.tracking.uri, _launch_dir()),
                                             cfg.tracking.experiment)
    out_dir = _output_dir()
    overrides = _overrides()
    tags = {**_versions(), "device": _device_name(cuda), tracking.OVERRIDES_TAG: overrides}
    run_name = tracking.run_name(overrides, fallback=cfg.model.name)
    with tracking.job_run(experiment_id, run_name, tracking.job_params(raw), tags,
                          run_id_file=out_dir / tracking.RUN_ID_FILE if out_dir else None):
        cfg, ds_config, residency = ready(cfg, cuda)
        predicted = {"predicted_peak_gpu_bytes": residency.predicted_peak_bytes,
                     "predicted_resident_bytes": residency.resident_bytes}
        tracking.log_metrics(predicted)
        tracking.log_json(ds_config, "ds_config.json")
        tracking.log_text(OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=True))), "config.yaml")

        from zi_app.runner import run_inference

        result = run_inference(cfg, ds_config, on_metrics=tracking.log_metrics)
        tracking.log_json({"repeats": result.repeats, "generated_token_ids": result.output_ids}, "generation.json")
    log.info("result: %s", result_line(cfg, {**predicted, **result.metrics}))
    return result.metrics["tokens_per_sec"]


def result_line(cfg: DictConfig, m: dict) -> str:
    """One line with a job's headline numbers; the GPU and roofline figures where they were measured."""
    parts = [f"{cfg.model.name} batch={cfg.batch} {m['tokens_per_sec']:.2f} tokens/s",
             f"decode step {m.get('decode_step_s', float('nan')):.4f} s", f"prefill {m['prefill_s']:.3f} s",
             f"peak host {m['peak_host_rss_bytes'] / 2**30:.2f} GiB"]
    if "peak_gpu_allocated_bytes" in m:
        parts.append(f"peak GPU {m['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB "
                     f"(predicted {m['predicted_peak_gpu_bytes'] / 2**30:.2f})")
    if "roofline_ratio" in m:
        parts.append(f"{m['roofline_ratio']:.2f}x the roofline ({m['streamed_bytes_per_step'] / 1e9:.2f} GB/step "
                     f"at {m['h2d_gbps']:.1f} GB/s)")
    return ", ".join(parts)


def dry_run(cfg: DictConfig) -> None:
    """Print the DeepSpeed config of ``cfg`` as one JSON document on stdout; load nothing, log nothing."""
    import torch

    print(json.dumps(ready(cfg, torch.cuda.is_available(), running=False)[1], indent=2))


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """``python -m zi_app [overrides]``: one ZeRO-Inference job (``-m`` for a sweep)."""
    try:
        if cfg.dry_run:
            return dry_run(cfg)
        return run_job(cfg)
    except ConfigError as error:
        print(f"error: invalid config: {error}", file=sys.stderr)
        if _multirun():
            raise
        sys.exit(EXIT_INVALID_CONFIG)
