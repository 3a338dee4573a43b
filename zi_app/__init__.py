"""hydra-zero-inference: compose, run and measure DeepSpeed ZeRO-Inference setups from Hydra config groups.

Public API (cheap to import): :func:`build_ds_config`, :func:`validate` (a composed config as its frozen
:class:`JobSpec`), :class:`ConfigError`, :func:`conf_dir`, and :func:`run_inference`, which imports
torch/DeepSpeed only when called. The package's stages, in the order a job goes through them: ``config``,
``plan``, ``run``, ``record`` (docs/architecture.md).
"""

from zi_app.config.checks import ConfigError
from zi_app.config.paths import conf_dir
from zi_app.config.schema import JobSpec
from zi_app.config.spec import validate

__all__ = ["build_ds_config", "conf_dir", "validate", "ConfigError", "JobSpec", "run_inference"]
__version__ = "0.1.0"


def build_ds_config(cfg, facts=None, device_bytes=None) -> dict:
    """The complete DeepSpeed config of a composed zero-inference job, on any machine.

    ``cfg`` is the node holding the zero-inference groups (the whole config, or e.g. ``cfg.zi`` where they
    are mounted), or its :class:`JobSpec`. Only the schema's keys are read
    (:func:`zi_app.config.schema.schema_keys`): an app's own keys beside them are left alone. They are
    validated first (a bad value raises :class:`ConfigError` naming the key), and real weights' architecture
    is read from ``model.path``. ``facts`` (:class:`zi_app.plan.facts.ModelFacts`) are read from the
    architecture on the meta device when the memory settings need them and none are given; ``device_bytes``
    is the GPU memory ``memory.persistence=auto`` plans against when ``memory.gpu_budget_gib`` is not set.
    """
    from zi_app.plan import dsconfig
    from zi_app.plan.facts import model_facts
    from zi_app.plan.job import residency
    from zi_app.plan.workload import budget_bytes, workload

    spec = validate(cfg)
    if facts is None and dsconfig.needs_facts(spec):
        facts = model_facts(spec.model.arch)
    planned = residency(spec, workload(spec), facts, budget_bytes(spec, device_bytes)) if facts else None
    return dsconfig.build_ds_config(spec, facts, planned)


def run_inference(cfg, **kwargs):
    """Run the inference-and-measure step for a composed config, from any app's task function.

    ``cfg`` is the node holding the zero-inference groups (the whole config, or e.g. ``cfg.zi`` where
    they are mounted); keys it lacks take the schema's defaults. The steps are those of
    ``python -m zi_app`` without MLflow: validate (ConfigError names a bad key), read real weights'
    architecture, check the machine, plan the DeepSpeed config against the GPU, run under ZeRO-3.
    ``kwargs`` go to :func:`zi_app.run.inference.run_inference` (``on_progress``, ``on_metrics``). Returns its
    :class:`zi_app.run.inference.InferenceResult` (``metrics``, ``repeats``, ``output_ids``). Call it once per
    process: ZeRO-3's state is process-wide.
    """
    import torch

    from zi_app.plan.job import ready
    from zi_app.run.inference import run_inference as run

    plan = ready(validate(cfg), torch.cuda.is_available())
    return run(plan.spec, plan.ds_config, plan.facts, **kwargs)
