"""hydra-zero-inference: compose, run and measure DeepSpeed ZeRO-Inference setups from Hydra config groups.

Public API (cheap to import): :func:`build_ds_config`, :func:`validate`, :func:`conf_dir`.
The heavy entry point :func:`zi_app.runner.run_inference` imports torch/deepspeed when called.
"""

from zi_app.dsconfig import build_ds_config
from zi_app.paths import conf_dir
from zi_app.schema import ConfigError, validate

__all__ = ["build_ds_config", "conf_dir", "validate", "ConfigError"]
__version__ = "0.1.0"
