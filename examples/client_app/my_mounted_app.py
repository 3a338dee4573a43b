"""A Hydra app of your own with hydra-zero-inference's groups mounted under ``zi``, beside its own keys.

``python my_mounted_app.py [overrides]`` prints the DeepSpeed config; with ``measure=true`` it also runs the
inference-and-measure step (ZeRO-3, real model) and prints the measurements as one JSON line. Overrides
name a mounted group with its package (``offload@zi.offload=none``) and a value by its path (``zi.batch=4``).
"""

import json

import hydra
from omegaconf import DictConfig

import zi_app


@hydra.main(version_base="1.3", config_path="conf", config_name="my_mounted_app")
def main(cfg: DictConfig) -> None:
    """Print the DeepSpeed config of ``cfg.zi``; with ``measure=true`` run it and print its metrics."""
    print(json.dumps(zi_app.build_ds_config(cfg.zi), indent=2))
    if cfg.measure:
        result = zi_app.run_inference(cfg.zi)
        print(json.dumps(result.metrics))


if __name__ == "__main__":
    main()
