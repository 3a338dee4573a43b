"""The plain-GPU baseline of benchmarks/compare.py: the model loaded with transformers straight onto the GPU
(no DeepSpeed, no hooks, nothing offloaded), timed exactly as the app times a ZeRO-3 job.

    python benchmarks/plain_gpu.py --run-dir DIR [zi_app overrides...]

Composes the app's config from the same overrides (model, dtype, batch, prompt_len, gen_len, warmup, repeat,
seed, tracking.*), logs one MLflow run with the app's metric names and writes its run id to
``DIR/mlflow_run_id``, as ``python -m zi_app`` does. A model that does not fit the GPU fails with CUDA OOM,
recorded on the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zi_app import conf_dir, measure, tracking
from zi_app.jobplan import prepare
from zi_app.model import load_model
from zi_app.runner import random_prompts, timed_generates
from zi_app.schema import ConfigError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path, help="where the run id file is written")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/plain_gpu.py loads the model onto a CUDA GPU, and torch sees none here")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = prepare(compose("config", overrides=args.overrides))
    if cfg.quant.mode != "none":
        raise ConfigError("quant", cfg.quant.mode, "none for the plain-GPU baseline (quantization is DeepSpeed's)")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.open_experiment(tracking.absolute_uri(cfg.tracking.uri), cfg.tracking.experiment)
    params = tracking.job_params(OmegaConf.to_container(cfg, resolve=True))
    tags = {"zi.baseline": "plain-gpu", tracking.OVERRIDES_TAG: " ".join(args.overrides)}
    with tracking.job_run(experiment_id, f"plain-gpu,{cfg.model.name}", params, tags,
                          run_id_file=args.run_dir / tracking.RUN_ID_FILE):
        with measure.peak_memory() as peaks:
            with measure.stopwatch() as load, torch.device("cuda"):
                model = load_model(cfg, cfg.model.path)
            tracking.log_metrics({"load_s": load.seconds})
            prompts = random_prompts(cfg.batch, cfg.prompt_len, model.config.vocab_size, cfg.seed, "cuda")
            speed, _, _ = timed_generates(cfg, model, prompts, print)
        metrics = {**speed, **peaks.as_metrics()}
        tracking.log_metrics(metrics)
    print(f"plain GPU: {metrics['tokens_per_sec']:.2f} tokens/s, decode step {metrics['decode_step_s']:.4f} s, "
          f"peak GPU {metrics['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
