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
from zi_app import ConfigError, conf_dir, validate
from zi_app.config.schema import as_config
from zi_app.record import runs, store
from zi_app.run import measure
from zi_app.run.inference import random_prompts, timed_generates
from zi_app.run.loading import load_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path, help="where the run id file is written")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/plain_gpu.py loads the model onto a CUDA GPU, and torch sees none here")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = validate(compose("config", overrides=args.overrides))
    if cfg.quant.mode != "none":
        raise ConfigError("quant", cfg.quant.mode, "none for the plain-GPU baseline (quantization is DeepSpeed's)")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = store.open_experiment(store.absolute_uri(cfg.tracking.uri), cfg.tracking.experiment)
    params = runs.job_params(as_config(cfg))
    tags = {"zi.baseline": "plain-gpu", runs.OVERRIDES_TAG: " ".join(args.overrides)}
    with runs.job_run(experiment_id, f"plain-gpu,{cfg.model.name}", params, tags,
                      run_id_file=args.run_dir / runs.RUN_ID_FILE):
        with measure.peak_memory() as peaks:
            with measure.stopwatch() as load, torch.device("cuda"):
                model = load_model(cfg)
            runs.log_metrics({"load_s": load.seconds})
            prompts = random_prompts(cfg.batch, cfg.prompt_len, model.config.vocab_size, cfg.seed, "cuda")
            speed, _, _ = timed_generates(cfg, model, prompts, print)
        metrics = {**speed, **peaks.as_metrics()}
        runs.log_metrics(metrics)
    print(f"plain GPU: {metrics['tokens_per_sec']:.2f} tokens/s, decode step {metrics['decode_step_s']:.4f} s, "
          f"peak GPU {metrics['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
