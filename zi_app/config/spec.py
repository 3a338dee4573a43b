"""Validation: a composed config becomes one frozen :class:`~zi_app.config.schema.JobSpec`, made once per job.

The schema's keys are merged over its defaults (type-checked by OmegaConf), the dtype gets its long name,
real weights' architecture is read from their checkpoint, every key is checked
(:mod:`zi_app.config.checks`), and the model's sizes are read once (``spec.model.shape``). Every stage
below takes the spec; none merges defaults again or reads sizes from the raw architecture.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from zi_app.config.checks import ARCH_HIDDEN, DTYPE_ALIASES, ConfigError, check
from zi_app.config.paths import weight_files
from zi_app.config.schema import (AioSpec, HardwareSpec, JobSpec, KVCacheSpec, MemorySpec, ModelShape, ModelSpec,
                                  OffloadSpec, QuantSpec, TrackingSpec, ZIConfig, freeze, schema_keys)


def default_cache_dir() -> str:
    """``$ZI_CACHE_DIR``, else ``~/.cache/hydra-zero-inference``: the default conf/config.yaml sets too."""
    return os.environ.get("ZI_CACHE_DIR") or str(Path.home() / ".cache" / "hydra-zero-inference")


def _own_keys(cfg: Any) -> Dict[str, Any]:
    """The schema's keys of ``cfg``, values resolved where they stand: a client app's own keys (its
    ``trainer``, ``data``, ...) beside ours are left out, and interpolations into them still resolve."""
    if not isinstance(cfg, DictConfig):
        return {k: v for k, v in (cfg or {}).items() if k in schema_keys()}
    own = {}
    for key in schema_keys():
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            continue
        value = cfg[key]
        own[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return own


def _config_error(error: OmegaConfBaseException, own: Any) -> ConfigError:
    """Our message for what OmegaConf refuses while merging ``own`` over the schema: an unknown key or a
    value of the wrong type."""
    key = error.full_key or str(error.key)
    value = error.value if error.value is not None else OmegaConf.select(OmegaConf.create(own), key)
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(OmegaConf.structured(ZIConfig), parent) if parent else OmegaConf.structured(ZIConfig)
        known = ", ".join(node.keys()) if isinstance(node, DictConfig) else "none"
        return ConfigError(key, value, f"a key of {parent or 'the zero-inference schema'}: {known}")
    return ConfigError(key, value, str(error.msg).splitlines()[0])


def composition_error(error: BaseException, overrides: Sequence[str] = ()) -> Optional[ConfigError]:
    """Our :class:`ConfigError` for Hydra's refusal to compose the command line's ``overrides``: a group
    option that does not exist (``model=nope``), a key the schema lacks (``foo=1``) or a value of the wrong
    type (``batch=abc``); None for any other error."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return ConfigError(group.replace("/", "."), option, f"one of {', '.join(error.options)}")
    if not isinstance(error.__cause__, OmegaConfBaseException):
        return None
    try:  # the values as typed, so that the message shows the one refused
        given = OmegaConf.from_dotlist([override.lstrip("+~") for override in overrides if "=" in override])
    except OmegaConfBaseException:
        given = {}
    return _config_error(error.__cause__, given)


def check_task(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` for what an app whose whole task config is ours (``zi``) must not take,
    though composition lets it through: a top-level key the schema lacks (``+bacth=8``: a typo that would
    run batch 1), a value that does not resolve (``batch=${oc.env:UNSET}``), and a number given on the
    command line (``overrides``) for a true/false key (``profile_step=2``, which OmegaConf takes as true).
    :func:`validate` leaves a client app's own keys alone instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    known = schema_keys()
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(key, value, f"a key of the zero-inference schema: {', '.join(known)}")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = error.full_key or str(error.key)
        value: Any = raw
        for part in key.split("."):  # the value as written: selecting it through OmegaConf would resolve it
            value = value.get(part) if isinstance(value, dict) else None
        raise ConfigError(key, value, f"a value that resolves ({str(error).splitlines()[0]})") from None
    schema = OmegaConf.structured(ZIConfig)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not isinstance(OmegaConf.select(schema, key, default=None), bool):
            continue
        if override.is_sweep_override():
            if override.value_type == ValueType.INTERVAL_SWEEP:
                continue  # an optimizer's range of numbers: no value of its own to check
            values = list(override.sweep_iterator())  # each point a sweep would run: pin=true,false
        else:
            values = [override.value()]
        for value in values:
            if not isinstance(value, (bool, list, type(None))):  # a list, a deletion: not a value
                raise ConfigError(key, value, "true or false")


def _merged(cfg: Any) -> DictConfig:
    """The schema's keys of ``cfg`` (a DictConfig or dict, possibly partial) merged over the schema's
    defaults, type-checked, ``model.dtype`` by its long name; other top-level keys are the caller's."""
    base = OmegaConf.structured(ZIConfig)
    base.cache_dir = default_cache_dir()
    own: Any = {}
    try:
        own = _own_keys(cfg)  # resolving our keys may fail too (an interpolation to a missing key)
        merged = OmegaConf.merge(base, own)
    except OmegaConfBaseException as error:
        raise _config_error(error, own) from None
    merged.model.dtype = DTYPE_ALIASES.get(merged.model.dtype, merged.model.dtype)
    return merged


def architecture_from_checkpoint(path: str) -> Dict[str, Any]:
    """The transformers config of a checkpoint (local directory or cached hub id) as a plain dict."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    arch = config.to_diff_dict()
    arch["model_type"] = config.model_type
    arch["hidden_size"] = config.hidden_size
    arch.setdefault("max_position_embeddings", getattr(config, "max_position_embeddings", None))
    return {k: v for k, v in arch.items() if v is not None and not k.startswith("_") and k != "transformers_version"}


def largest_weight_file(model: ModelSpec) -> Optional[int]:
    """Bytes of the largest weight file of a local checkpoint (what the planner counts for reading it one file at
    a time, docs/planner.md), or None for random weights or a hub id."""
    if model.weights != "pretrained" or not model.path or not os.path.isdir(os.path.expanduser(model.path)):
        return None
    return max((path.stat().st_size for path in weight_files(model.path)), default=None)


def checkpoint_loader(model: ModelSpec) -> str:
    """``model.loader`` resolved for pretrained weights: ``auto`` reads a local directory file by file, a hub id
    through transformers. Random weights read nothing: their ``auto`` stays as it is."""
    if model.loader != "auto" or model.weights != "pretrained":
        return model.loader
    return "files" if Path(os.path.expanduser(model.path)).is_dir() else "transformers"


# transformers families whose MLP is LlamaMLP's act_fn(gate_proj(x)) * up_proj(x)
GATED_MLP_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# transformers families whose attention materializes the scores (no SDPA or attention-interface path)
EAGER_ATTENTION_MODEL_TYPES = frozenset({"bloom"})


def model_shape(arch: Any) -> ModelShape:
    """The sizes of a checked architecture (a transformers config dict), under each family's key names."""
    hidden = next(int(arch[key]) for key in ARCH_HIDDEN if arch.get(key))
    heads = int(arch.get("num_attention_heads") or arch.get("n_head") or 1)
    positions = arch.get("max_position_embeddings") or arch.get("n_positions")
    return ModelShape(hidden_size=hidden, layers=int(arch.get("num_hidden_layers") or arch.get("n_layer") or 0),
                      heads=heads, kv_heads=int(arch.get("num_key_value_heads") or heads),
                      ffn_dim=int(arch.get("ffn_dim") or arch.get("intermediate_size") or 4 * hidden),
                      vocab_size=int(arch.get("vocab_size", 0)),
                      embed_dim=int(arch.get("word_embed_proj_dim") or hidden),
                      max_positions=int(positions) if positions else None,
                      tied_embeddings=bool(arch.get("tie_word_embeddings", True)),
                      gated_mlp=arch.get("model_type") in GATED_MLP_MODEL_TYPES,
                      eager_attention=arch.get("model_type") in EAGER_ATTENTION_MODEL_TYPES)


def _check_model_type(model_type: Any) -> None:
    """Random weights are built from ``model.arch`` by transformers' config class of its ``model_type``: one
    it does not know would fail while loading, after the plan."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # lazily: 2 s to import

    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError("model.arch.model_type", model_type,
                          "a model type of the installed transformers, such as opt, llama or bloom")


HUB_TIMEOUT_S = 3  # how long the hub's host may take to accept a connection before we call this machine offline


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) accepts a connection: offline, transformers retries
    for about 25 s before failing with a message about the internet."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _checkpoint_architecture(path: str) -> Dict[str, Any]:
    """:func:`architecture_from_checkpoint`, or :class:`ConfigError` naming ``model.path`` for a checkpoint
    that is not here and cannot be fetched, or that transformers cannot read."""
    if not Path(os.path.expanduser(path)).is_dir():
        from huggingface_hub import constants, try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str) and not _hub_reachable():
            raise ConfigError("model.path", path,
                              f"a local directory holding config.json, or a hub id in the local hub cache "
                              f"({constants.HF_HUB_CACHE}): it is neither, and the hub cannot be reached from "
                              f"here (offline)")
    try:
        return architecture_from_checkpoint(path)
    except (OSError, ValueError) as error:  # no such repository, no config.json, a config it cannot parse
        raise ConfigError("model.path", path,
                          f"a checkpoint transformers can read ({str(error).strip().splitlines()[0]})") from None


_SPECS = {"model": ModelSpec, "offload": OffloadSpec, "quant": QuantSpec, "kvcache": KVCacheSpec,
          "memory": MemorySpec, "hardware": HardwareSpec, "tracking": TrackingSpec}


def _freeze(checked: DictConfig) -> JobSpec:
    tree = OmegaConf.to_container(checked, resolve=True)
    groups = {name: spec_class(**freeze(tree.pop(name))) for name, spec_class in _SPECS.items()}
    if groups["offload"].aio is not None:
        groups["offload"] = dataclasses.replace(groups["offload"], aio=AioSpec(**groups["offload"].aio))
    model = groups["model"]
    groups["model"] = dataclasses.replace(model, shape=model_shape(model.arch), loader=checkpoint_loader(model),
                                          largest_file_bytes=largest_weight_file(model))
    return JobSpec(**groups, **tree)


def validate(cfg: Any) -> JobSpec:
    """The job spec of ``cfg``, or :class:`ConfigError` for its first bad key.

    ``cfg`` is the node holding the zero-inference groups (a composed DictConfig, e.g. ``cfg`` or a client
    app's ``cfg.zi``, or a dict); keys it lacks take the schema's defaults, keys not the schema's are left
    alone. Real weights' architecture is read from ``model.path`` (imports transformers).
    """
    if isinstance(cfg, JobSpec):
        return cfg
    merged = _merged(cfg)
    if merged.model.weights == "pretrained" and merged.model.path:
        check(merged)  # the path is checked before anything reads it
        arch = _checkpoint_architecture(merged.model.path)
        with open_dict(merged):
            merged.model.arch = arch
            merged.model.max_positions = merged.model.max_positions or arch.get("max_position_embeddings")
    check(merged)
    if merged.model.weights == "random":
        _check_model_type(merged.model.arch.get("model_type"))
    return _freeze(merged)
