"""The checks that turn bad input into one clear message: :class:`ConfigError` names the key, the bad value and
what is allowed. Checks of the configuration and the paths it names only; what the machine lacks is the plan
stage's (:mod:`zi_app.plan.preflight`). Cheap to import.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

EXIT_INVALID_CONFIG = 2  # the exit status of every command that refuses its configuration
DTYPES = ("float32", "float16", "bfloat16")
# The short names users type (as in torch's and DeepSpeed's configs) for the long ones the app uses.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
QUANT_MODES = ("none", "init", "post")
QUANT_BITS = (4, 8)
CACHE_IMPLEMENTATIONS = (None, "host", "offloaded")
KV_ATTENTION = ("device", "host")
KV_QUANT = ("none", "int8", "int4")
KV_DEQUANT = ("auto", "triton", "torch")
KV_QUANT_GROUP = 64  # elements of a head sharing a minimum and a step in a quantized KV cache (zi_app/run/kvcache.py)
# Tokens it quantizes or dequantizes at once: their float32 and unpacked temporaries stay a small part of a
# layer's cache on the GPU (a prompt's or a prefix's whole would be several times one).
KV_QUANT_CHUNK_TOKENS = 64
WEIGHTS = ("random", "pretrained")
LOADERS = ("auto", "files", "transformers")
PERSISTENCE_WORDS = ("h", "hh", "auto")
FETCH_MODES = ("deepspeed", "overlap")
PIN_BACKENDS = ("torch", "native")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and fails with an OverflowError past it)
# The lowest token id random prompts draw (zi_app/run/inference.py): ids below are special tokens.
FIRST_PROMPT_TOKEN = 4
TRACKING_SCHEMES = ("sqlite:///", "http://", "https://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ConfigError(ValueError):
    """A config value that cannot run; names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")

    def __reduce__(self):
        # Launchers that run jobs elsewhere (submitit, joblib, ray) pickle a failed job's exception
        # back to the driver; the default would call __init__ with the message alone.
        return type(self), (self.key, self.value, self.allowed)


def every_problem(problems: Sequence[ConfigError]) -> ConfigError:
    """One :class:`ConfigError` whose one line carries every problem (``; `` between them), keyed by the
    first: the user fixes them all at once instead of meeting them one run at a time."""
    first, *rest = problems
    if not rest:
        return first
    return ConfigError(first.key, first.value, "; ".join([first.allowed, *map(str, rest)]))


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "a positive integer")


def _number(key: str, value: Any, allowed: str, positive: bool = True) -> None:
    """A finite number, > 0 (``positive``) or >= 0: NaN passes every comparison that is false, so the test is
    written to fail for it; inf would pass a lower bound and poison every prediction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (value > 0 if positive else value >= 0):
        raise ConfigError(key, value, allowed)


def _check_workload(cfg: Any) -> None:
    for key in ("batch", "devices", "prompt_len", "gen_len", "repeat"):
        _positive_int(key, cfg[key])
    if cfg.warmup < 0:
        raise ConfigError("warmup", cfg.warmup, "an integer >= 0")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError("seed", cfg.seed, "an integer from 0 to 2**64 - 1 (what torch's generator takes)")
    arch_limit = cfg.model.arch.get("max_position_embeddings")
    if cfg.model.max_positions is not None:
        _positive_int("model.max_positions", cfg.model.max_positions)
        if arch_limit and cfg.model.max_positions > arch_limit:
            raise ConfigError("model.max_positions", cfg.model.max_positions,
                              f"at most the architecture's {arch_limit} positions "
                              f"(model.arch.max_position_embeddings): lower it, or null for the architecture's own")
    limit = cfg.model.max_positions or arch_limit
    if limit and cfg.prompt_len + cfg.gen_len > limit:
        raise ConfigError(
            "prompt_len", cfg.prompt_len,
            f"prompt_len + gen_len = {cfg.prompt_len + cfg.gen_len} exceeds model {cfg.model.name}'s "
            f"{limit} positions; keep it <= {limit}")


def _check_model(model: Any) -> None:
    if model.dtype not in DTYPES:
        raise ConfigError("model.dtype", model.dtype, f"one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    if model.weights not in WEIGHTS:
        raise ConfigError("model.weights", model.weights, f"one of {', '.join(WEIGHTS)}")
    if model.loader not in LOADERS:
        raise ConfigError("model.loader", model.loader, f"one of {', '.join(LOADERS)}")
    if model.weights == "pretrained":
        if not model.path:
            raise ConfigError("model.path", model.path, "a local directory or hub id when model.weights=pretrained")
        local = Path(os.path.expanduser(model.path))
        looks_local = model.path.startswith(("/", ".", "~")) or not _HUB_ID.match(model.path)
        if looks_local and not (local / "config.json").is_file():
            raise ConfigError("model.path", model.path,
                              "an existing directory holding config.json (as written by save_pretrained) or a hub id")
        if model.loader == "files" and not looks_local:
            raise ConfigError("model.loader", model.loader,
                              "auto or transformers for a hub id (files reads a local directory's weight files)")
    elif model.path:
        raise ConfigError("model.weights", model.weights,
                          "'pretrained' when model.path is set (add model.weights=pretrained, or use model=pretrained)")
    elif "hidden_size" not in model.arch:
        raise ConfigError("model.arch.hidden_size", None, "the architecture's hidden size (random weights need `arch`)")
    _check_arch(model.arch)


MAX_LAYERS = 1024  # model.arch.num_hidden_layers / n_layer: beyond any released causal LM
# Size keys of transformers configs, under each family's names (BLOOM: n_head, n_layer).
_ARCH_SIZES = ("hidden_size", "num_hidden_layers", "n_layer", "vocab_size", "intermediate_size", "ffn_dim",
               "word_embed_proj_dim", "max_position_embeddings")
_ARCH_HEADS = ("num_attention_heads", "n_head")
_ARCH_LAYERS = ("num_hidden_layers", "n_layer")
ARCH_HIDDEN = ("hidden_size", "n_embed", "d_model", "n_embd")  # the hidden size, under each family's name


def _check_arch(arch: Any) -> None:
    """The architecture's sizes are positive integers, its attention heads divide the hidden size and its
    key/value heads divide the attention heads (what transformers would fail on, without naming the key)."""
    for key in (*_ARCH_SIZES, *_ARCH_HEADS, "num_key_value_heads"):
        if arch.get(key) is not None:
            _positive_int(f"model.arch.{key}", arch[key])
    for key in _ARCH_LAYERS:
        # Checked before the model's facts are read from a meta model, which builds every layer (100000 took
        # minutes before any refusal).
        if arch.get(key) is not None and arch[key] > MAX_LAYERS:
            raise ConfigError(f"model.arch.{key}", arch[key],
                              f"at most {MAX_LAYERS} layers (the largest released causal LMs have under 200)")
    if arch.get("vocab_size") is not None and arch["vocab_size"] <= FIRST_PROMPT_TOKEN:
        raise ConfigError("model.arch.vocab_size", arch["vocab_size"],
                          f"more than {FIRST_PROMPT_TOKEN} tokens (random prompts draw ids from {FIRST_PROMPT_TOKEN} "
                          f"up to the vocabulary's size)")
    hidden = arch.get("hidden_size")
    heads_key = next((key for key in _ARCH_HEADS if arch.get(key) is not None), None)
    if heads_key is None:
        return
    heads = arch[heads_key]
    if hidden is not None and hidden % heads:
        nearest = sorted((n for n in range(1, hidden + 1) if hidden % n == 0), key=lambda n: abs(n - heads))[:2]
        raise ConfigError(f"model.arch.{heads_key}", heads,
                          f"a divisor of hidden_size {hidden} (the nearest: {' or '.join(map(str, sorted(nearest)))})")
    kv_heads = arch.get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        raise ConfigError("model.arch.num_key_value_heads", kv_heads, f"a divisor of {heads_key} {heads}")


def _check_offload(offload: Any) -> None:
    if offload.device not in OFFLOAD_DEVICES:
        raise ConfigError("offload.device", offload.device, f"one of {', '.join(OFFLOAD_DEVICES)}")
    if offload.device != "nvme":
        return
    # Whether the directory exists is a fact of the machine that runs the job (zi_app.plan.preflight).
    if not offload.nvme_path:
        raise ConfigError("offload.nvme_path", offload.nvme_path, "a directory on a fast local disk")
    if offload.buffer_count is not None:
        _positive_int("offload.buffer_count", offload.buffer_count)
    if offload.buffer_size is not None:
        _positive_int("offload.buffer_size", offload.buffer_size)


def _check_quant(quant: Any, model: Any) -> None:
    if quant.mode not in QUANT_MODES:
        raise ConfigError("quant.mode", quant.mode, f"one of {', '.join(QUANT_MODES)}")
    if quant.mode == "none":
        return
    if quant.bits not in QUANT_BITS:
        raise ConfigError("quant.bits", quant.bits, "4 or 8 (DeepSpeed's group-wise weight quantizer)")
    if quant.symmetric is not False:
        raise ConfigError("quant.symmetric", quant.symmetric, "false (DeepSpeed implements asymmetric only)")
    _positive_int("quant.group_size", quant.group_size)
    hidden = model.arch.get("hidden_size")
    if quant.group_size % 8 or (hidden and hidden % quant.group_size):
        raise ConfigError("quant.group_size", quant.group_size,
                          f"a multiple of 8 that divides the hidden size {hidden}")
    if quant.group_dim not in (0, 1):
        raise ConfigError("quant.group_dim", quant.group_dim, "0 or 1 (a dimension of a 2-D weight)")
    if quant.mode == "post":
        if model.dtype != "float16":
            raise ConfigError("quant.mode", quant.mode,
                              f"'post' needs model.dtype=float16 (DeepSpeed's post_init_quant is fp16 only), "
                              f"got {model.dtype}; use quant=int4/int8 (init-time) instead")
        if not quant.modules:
            raise ConfigError("quant.modules", quant.modules, "a non-empty list of module-name substrings")


def _check_memory(memory: Any) -> None:
    for key in ("prefetch_bucket_hh", "max_live_hh"):
        _number(f"memory.{key}", memory[key], "a positive, finite multiple of h*h")
    if memory.persistence not in PERSISTENCE_WORDS and not str(memory.persistence).isdigit():
        raise ConfigError("memory.persistence", memory.persistence,
                          "'h' (h elements), 'hh' (h*h+1), 'auto' (planned against the GPU budget) "
                          "or a non-negative integer element count")
    reuse = memory.max_reuse_distance
    if reuse is not None and reuse != "model" and not str(reuse).isdigit():
        raise ConfigError("memory.max_reuse_distance", reuse,
                          "null (DeepSpeed's default), 'model' (keep weights reused within a forward) or an integer")
    if memory.gpu_budget_gib is not None:
        _number("memory.gpu_budget_gib", memory.gpu_budget_gib, "a positive, finite number of GiB, or null")
    if memory.fetch not in FETCH_MODES:
        raise ConfigError("memory.fetch", memory.fetch,
                          "'deepspeed' (ZeRO-3's parameter coordinator as shipped) or 'overlap' (zi_app/run/fetch.py)")
    _positive_int("memory.max_inflight_fetches", memory.max_inflight_fetches)
    if memory.pin_backend not in PIN_BACKENDS:
        raise ConfigError("memory.pin_backend", memory.pin_backend,
                          "'torch' (torch's caching host allocator: each pinned partition rounded up to a power of "
                          "two) or 'native' (DeepSpeed's page-locked allocations at their own size)")


def kv_quant_group(head_dim: int) -> int:
    """Elements per quantization group of a quantized KV cache's head of ``head_dim`` elements."""
    return min(KV_QUANT_GROUP, head_dim)


def _check_kvcache(kvcache: Any, model: Any) -> None:
    if kvcache.cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ConfigError("kvcache.cache_implementation", kvcache.cache_implementation,
                          "null (transformers' GPU cache), 'host' (host memory allocated once, zi_app/run/kvcache.py) or "
                          "'offloaded' (transformers' offloaded cache)")
    if kvcache.attention not in KV_ATTENTION:
        raise ConfigError("kvcache.attention", kvcache.attention,
                          "'device' (each layer's cached prefix copied up for the GPU's attention) or 'host' (the "
                          "CPU attends where the cache lives; with kvcache=cpu)")
    if kvcache.attention == "host" and kvcache.cache_implementation != "host":
        raise ConfigError("kvcache.attention", kvcache.attention,
                          "'device' with this cache: attention on the host needs the cache there, kvcache=cpu "
                          f"(kvcache.cache_implementation='host', not {kvcache.cache_implementation!r})")
    if kvcache.quant not in KV_QUANT:
        raise ConfigError("kvcache.quant", kvcache.quant, "'none', 'int8' or 'int4' (the host cache's width)")
    if kvcache.quant != "none" and (kvcache.cache_implementation != "host" or kvcache.attention != "device"):
        raise ConfigError("kvcache.quant", kvcache.quant,
                          "'none' with this cache: a quantized cache is ours in host memory attended on the GPU, "
                          "kvcache=cpu with kvcache.attention=device")
    _check_kv_gpu_layers(kvcache, model)
    if kvcache.dequant not in KV_DEQUANT:
        raise ConfigError("kvcache.dequant", kvcache.dequant,
                          "'auto', 'triton' (one fused kernel) or 'torch' (PyTorch's kernels): how the GPU dequantizes "
                          "a quantized cache")
    hidden = next((model.arch[key] for key in ARCH_HIDDEN if model.arch.get(key)), None)
    heads = next((model.arch[key] for key in _ARCH_HEADS if model.arch.get(key)), None)
    if kvcache.quant != "none" and hidden and heads:
        head_dim = hidden // heads
        group = kv_quant_group(head_dim)
        if head_dim % group or group % 2:
            raise ConfigError("kvcache.quant", kvcache.quant,
                              f"'none' for this model: a quantized cache takes groups of {group} of a head's "
                              f"{head_dim} elements (an even number dividing it)")


def _check_kv_gpu_layers(kvcache: Any, model: Any) -> None:
    value = str(kvcache.gpu_layers)
    layers = next((model.arch[key] for key in _ARCH_LAYERS if model.arch.get(key)), None)
    allowed = f"'auto' or a whole number from 0 to the model's {layers or 'number of'} layers"
    if value != "auto" and not (value.isdigit() and (layers is None or int(value) <= layers)):
        raise ConfigError("kvcache.gpu_layers", kvcache.gpu_layers, allowed)
    if value != "0" and (kvcache.cache_implementation != "host" or kvcache.attention != "device"):
        raise ConfigError("kvcache.gpu_layers", kvcache.gpu_layers,
                          "0 with this cache: layers kept on the GPU are a part of ours in host memory attended on "
                          "the GPU, kvcache=cpu with kvcache.attention=device")


def _check_hardware(hardware: Any) -> None:
    for key in ("gpu_memory_gib", "host_memory_gib", "h2d_pinned_gbps", "h2d_pageable_gbps", "gpu_memory_gbps",
                "gpu_tflops", "gpu_peer_gbps", "host_attention_gbps"):
        if hardware[key] is not None:
            _number(f"hardware.{key}", hardware[key], "a positive, finite number, or null (measured here)")
    if hardware.gpu_count is not None:
        _positive_int("hardware.gpu_count", hardware.gpu_count)
    for key in ("stream_efficiency", "pageable_efficiency", "compute_efficiency", "memory_efficiency"):
        if not 0 < hardware[key] <= 1:
            raise ConfigError(f"hardware.{key}", hardware[key], "a fraction in (0, 1]")
    for key in ("fetch_overhead_s", "param_overhead_s", "dequant_overhead_s", "post_quant_overhead_s",
                "step_overhead_s"):
        _number(f"hardware.{key}", hardware[key], "finite seconds >= 0", positive=False)


def check_tracking(tracking: Any) -> None:
    """The MLflow store's keys: a SQLite file or a tracking server (MLflow's own database URIs would need
    their drivers and a schema migration in every job; a server over such a database is the way), a named
    experiment, and how long to wait for a server. Cheap: the entry point checks these before it opens the
    store, which comes before the rest of the config is validated."""
    if not str(tracking.uri).startswith(TRACKING_SCHEMES):
        raise ConfigError("tracking.uri", tracking.uri,
                          "sqlite:///<path> (a local store) or http(s)://<host>:<port> (an MLflow tracking server; "
                          "run `mlflow server --backend-store-uri postgresql://...` for a database)")
    uri = str(tracking.uri)
    if uri.startswith("sqlite:") and not uri.split(":", 1)[1].lstrip("/").strip():
        raise ConfigError("tracking.uri", tracking.uri, "sqlite:///<path of the database file>, e.g. "
                          "sqlite:///mlruns/mlflow.db (relative) or sqlite:////abs/path/mlflow.db")
    if not str(tracking.experiment).strip():
        raise ConfigError("tracking.experiment", tracking.experiment, "a non-empty experiment name")
    timeout = tracking.connect_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
        raise ConfigError("tracking.connect_timeout_s", timeout,
                          "seconds >= 0 to keep retrying a tracking server that does not answer (0: fail at once)")


def check(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first bad key of ``cfg`` (merged over the schema's defaults, dtype
    by its long name, the architecture known)."""
    _check_model(cfg.model)
    _check_workload(cfg)
    _check_offload(cfg.offload)
    _check_quant(cfg.quant, cfg.model)
    _check_memory(cfg.memory)
    _check_kvcache(cfg.kvcache, cfg.model)
    _check_hardware(cfg.hardware)
    check_tracking(cfg.tracking)
