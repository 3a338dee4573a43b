"""hydra-zero-inference: compose, run and measure DeepSpeed ZeRO-Inference setups from Hydra config groups.

Public API (cheap to import): :func:`build_ds_config`, :func:`validate`, :func:`conf_dir`, and
:func:`run_inference`, which imports torch/DeepSpeed only when called.
"""

from zi_app import dsconfig
from zi_app.paths import conf_dir
from zi_app.schema import ConfigError, validate

__all__ = ["build_ds_config", "conf_dir", "validate", "ConfigError", "run_inference"]
__version__ = "0.1.0"


def build_ds_config(cfg, facts=None, device_bytes=None) -> dict:
    """The complete DeepSpeed config of a composed zero-inference job, on any machine.

    ``cfg`` is the node holding the zero-inference groups (the whole config, or e.g. ``cfg.zi`` where they
    are mounted). Only the schema's keys are read (:func:`zi_app.schema.schema_keys`): an app's own keys
    beside them are left alone. They are validated first (a bad value raises :class:`ConfigError` naming
    the key), and real weights' architecture is read from ``model.path``. ``facts`` and ``device_bytes``
    go to :func:`zi_app.dsconfig.build_ds_config`.
    """
    from zi_app.jobplan import prepare

    return dsconfig.build_ds_config(prepare(cfg), facts, device_bytes)


def run_inference(cfg, **kwargs):
    """Run the inference-and-measure step for a composed config, from any app's task function.

    ``cfg`` is the node holding the zero-inference groups (the whole config, or e.g. ``cfg.zi`` where
    they are mounted); keys it lacks take the schema's defaults. The steps are those of
    ``python -m zi_app`` without MLflow: validate (ConfigError names a bad key), read real weights'
    architecture, check the machine, plan the DeepSpeed config against the GPU, run under ZeRO-3.
    ``kwargs`` go to :func:`zi_app.runner.run_inference` (``on_progress``, ``on_metrics``). Returns its
    :class:`zi_app.runner.InferenceResult` (``metrics``, ``repeats``, ``output_ids``). Call it once per
    process: ZeRO-3's state is process-wide.
    """
    import torch

    from zi_app.jobplan import ready
    from zi_app.runner import run_inference as run

    plan = ready(cfg, torch.cuda.is_available())
    return run(plan.cfg, plan.ds_config, **kwargs)
