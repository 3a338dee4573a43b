"""Checks of the machine a valid config must run on, done before anything expensive starts."""

from __future__ import annotations

import ctypes.util
from importlib import metadata
from pathlib import Path

from packaging.version import Version

from zi_app.schema import ConfigError

MIN_DEEPSPEED = Version("0.10.3")
_LIBAIO_HEADERS = ("/usr/include/libaio.h", "/usr/local/include/libaio.h")


def check_deepspeed_version(installed: str | None = None) -> None:
    """Refuse DeepSpeed releases older than ZeRO-Inference v2 (0.10.3)."""
    installed = installed or metadata.version("deepspeed")
    if Version(installed) < MIN_DEEPSPEED:
        raise ConfigError("deepspeed", installed, f"version >= {MIN_DEEPSPEED} (ZeRO-Inference weight quantization)")


def libaio_available() -> bool:
    """True when DeepSpeed's async_io op can JIT-build: libaio's shared library and header are installed."""
    return bool(ctypes.util.find_library("aio")) and any(Path(p).is_file() for p in _LIBAIO_HEADERS)


def check_environment(cfg, cuda: bool) -> None:
    """Raise ConfigError when the machine cannot run ``cfg`` (``cuda``: whether a CUDA device is usable)."""
    check_deepspeed_version()
    if cfg.offload.device == "nvme" and not libaio_available():
        raise ConfigError("offload.device", "nvme",
                          "cpu or none on this machine: libaio is missing (apt-get install libaio-dev), "
                          "so DeepSpeed's async_io op cannot be built")
    if not cuda:
        if cfg.kvcache.cache_implementation == "offloaded":
            raise ConfigError("kvcache", "cpu",
                              "gpu on a machine without CUDA (transformers' offloaded cache streams over CUDA streams)")
        if cfg.quant.mode != "none" and cfg.model.dtype == "float16":
            raise ConfigError("model.dtype", "float16",
                              "float32 or bfloat16 for quantized weights without CUDA (DeepSpeed's fp16 dequantizer "
                              "is CUDA-only)")


def check_dtype_supported(cfg) -> None:
    """Refuse a dtype DeepSpeed's accelerator cannot compute in (fp16 on CPUs without fp16 kernels).

    Imports DeepSpeed, so it runs for real jobs only: a dry run may prepare a GPU config on any machine.
    """
    from zi_app.engine import accelerator

    accel = accelerator()
    supported = {"float32": True, "float16": accel.is_fp16_supported(), "bfloat16": accel.is_bf16_supported()}
    if not supported[cfg.model.dtype]:
        allowed = " or ".join(dtype for dtype, ok in supported.items() if ok)
        arch = cfg.model.arch
        # A decoder layer holds about 12 h^2 weights: a billion of them is a model for a GPU, not a CPU.
        params = 12 * arch.get("hidden_size", 0) ** 2 * arch.get("num_hidden_layers", 0)
        meant_for_gpu = (f"; model={cfg.model.name} (about {params / 1e9:.0f}B parameters) is meant for a GPU, "
                         f"on this machine try model=tiny-opt" if accel.device_name() == "cpu" and params >= 1e9 else "")
        raise ConfigError("model.dtype", cfg.model.dtype,
                          f"{allowed} (the dtypes DeepSpeed's {accel.device_name()} accelerator computes in on "
                          f"this machine){meant_for_gpu}")
