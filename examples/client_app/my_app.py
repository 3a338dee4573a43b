"""A Hydra app of your own that composes hydra-zero-inference's groups at the top level of its config.

``python my_app.py [overrides]`` prints the DeepSpeed config of the composed job, e.g. with
``quant=int8 batch=8`` or ``model=my-model`` (this app's own option of the model group).
"""

import json

import hydra
from omegaconf import DictConfig

import zi_app


@hydra.main(version_base="1.3", config_path="conf", config_name="my_app")
def main(cfg: DictConfig) -> None:
    """Print the DeepSpeed config of the zero-inference job this app composed."""
    print(json.dumps(zi_app.build_ds_config(cfg), indent=2))


if __name__ == "__main__":
    main()
