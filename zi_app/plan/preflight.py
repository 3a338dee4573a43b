"""Checks of the machine a valid config must run on, done before anything expensive starts.

A config can be valid as configuration and still not run here (fp16 quantized weights without CUDA, NVMe
offload without libaio or without the directory it names): :func:`environment_problems` lists those as
:class:`ConfigError` values, so a dry run can print the DeepSpeed config with one warning each while a
real run refuses naming them all (:func:`check_environment`).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import resource
from importlib import metadata
from pathlib import Path
from typing import List

from packaging.version import Version

from zi_app.config.checks import ConfigError, every_problem
from zi_app.config.schema import JobSpec

MIN_DEEPSPEED = Version("0.10.3")
# memory.fetch=overlap (zi_app/run/fetch.py) subclasses DeepSpeed's parameter coordinator and reads its private
# state: allowed with the release it was written against and tested with only.
OVERLAP_FETCH_DEEPSPEED = Version("0.19.8")
_LIBAIO_HEADERS = ("/usr/include/libaio.h", "/usr/local/include/libaio.h")


def check_deepspeed_version(installed: str | None = None) -> None:
    """Refuse DeepSpeed releases older than ZeRO-Inference v2 (0.10.3)."""
    installed = installed or metadata.version("deepspeed")
    if Version(installed) < MIN_DEEPSPEED:
        raise ConfigError("deepspeed", installed, f"version >= {MIN_DEEPSPEED} (ZeRO-Inference weight quantization)")


def check_fetch_supported(fetch: str, installed: str | None = None) -> None:
    """Refuse ``memory.fetch=overlap`` unless the installed DeepSpeed is the release it was tested with."""
    if fetch != "overlap":
        return
    installed = installed or metadata.version("deepspeed")
    if Version(installed).public != OVERLAP_FETCH_DEEPSPEED.public:
        raise ConfigError("memory.fetch", fetch,
                          f"'deepspeed' with the installed DeepSpeed {installed}: 'overlap' replaces internals of "
                          f"DeepSpeed's parameter coordinator and is tested with DeepSpeed {OVERLAP_FETCH_DEEPSPEED} "
                          f"only (install deepspeed=={OVERLAP_FETCH_DEEPSPEED} to use it)")


def libaio_available() -> bool:
    """True when DeepSpeed's async_io op can JIT-build: libaio's shared library and header are installed."""
    return bool(ctypes.util.find_library("aio")) and any(Path(p).is_file() for p in _LIBAIO_HEADERS)


def _nvme_problems(offload) -> List[ConfigError]:
    problems = []
    if not libaio_available():
        problems.append(ConfigError("offload.device", "nvme",
                                    "cpu or none on this machine: libaio is missing (apt-get install libaio-dev), "
                                    "so DeepSpeed's async_io op cannot be built"))
    path = offload.nvme_path
    if not Path(path).is_dir():
        problems.append(ConfigError("offload.nvme_path", path, "an existing directory on a fast local disk"))
    elif not os.access(path, os.W_OK | os.X_OK):
        problems.append(ConfigError("offload.nvme_path", path, "a directory this user can write to"))
    return problems


def _has_deepspeed_module(*names: str) -> bool:
    """Whether the installed DeepSpeed has the module ``deepspeed.<names>``, found on disk without importing
    DeepSpeed (``find_spec`` of a submodule imports its packages: DeepSpeed's, with MLflow, 2.5 s of a plan)."""
    spec = importlib.util.find_spec("deepspeed")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, *names)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return True
    return False


def triton_installed() -> bool:
    """Whether Triton can be imported here (PyTorch's CUDA wheels for Linux bring it)."""
    return importlib.util.find_spec("triton") is not None


def kv_dequant_kernel(choice: str, on_cpu: bool, cuda: bool) -> str:
    """kvcache.dequant as a job runs it: ``choice`` unless it is ``auto``, which is Triton's fused kernel except
    where the job runs on DeepSpeed's CPU accelerator (``on_cpu``) or runs here on CUDA (``cuda``) without Triton
    installed. A job planned for a GPU elsewhere (a preset) is planned with Triton, as its PyTorch brings it."""
    if choice != "auto":
        return choice
    if on_cpu or (cuda and not triton_installed()):
        return "torch"
    return "triton"


def _kv_dequant_problems(spec: JobSpec, cuda: bool) -> List[ConfigError]:
    """kvcache.dequant=triton (as planned) where Triton is missing, or without CUDA outside its interpreter."""
    if spec.kvcache.dequant != "triton" or spec.kvcache.bits >= 16:
        return []
    if not triton_installed():
        return [ConfigError("kvcache.dequant", "triton", "'torch' here: Triton is not installed "
                                                          "(`pip install triton`, or PyTorch's CUDA wheel)")]
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return [ConfigError("kvcache.dequant", "triton",
                            "'torch' without CUDA (auto plans it for a GPU's hardware): Triton's kernels run on a "
                            "CUDA device, or on the CPU in its interpreter (TRITON_INTERPRET=1, as the tests run it)")]
    return []


def _pin_backend_problems(spec: JobSpec) -> List[ConfigError]:
    """memory.pin_backend=native where this DeepSpeed has no native pinned-memory backend, or where this
    process may not page-lock memory at all (RLIMIT_MEMLOCK, unless root)."""
    if spec.memory.pin_backend != "native" or not spec.pin or spec.offload.device == "none":
        return []
    if not _has_deepspeed_module("utils", "pin_memory"):
        return [ConfigError("memory.pin_backend", "native",
                            "'torch' with the installed DeepSpeed, which has no native pinned-memory backend "
                            "(DS_PIN_MEMORY_BACKEND=native, DeepSpeed 0.19.8)")]
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and hard < 2**30:
        return [ConfigError("memory.pin_backend", "native",
                            f"'torch' (or pin=false) here: this process may page-lock {hard / 2**20:.0f} MiB "
                            f"(RLIMIT_MEMLOCK, `ulimit -l`); raise it to unlimited to use 'native'")]
    return []


def environment_problems(cfg: JobSpec, cuda: bool) -> List[ConfigError]:
    """What this machine lacks to run the validated ``cfg`` (``cuda``: whether a CUDA device is usable), one
    :class:`ConfigError` per problem naming the key; empty when it can run here."""
    check_deepspeed_version()
    problems = _nvme_problems(cfg.offload) if cfg.offload.device == "nvme" else []
    problems += _pin_backend_problems(cfg)
    problems += _kv_dequant_problems(cfg, cuda)
    try:
        check_fetch_supported(cfg.memory.fetch)
    except ConfigError as refused:
        problems.append(refused)
    if cuda:
        import torch

        visible = torch.cuda.device_count()
        if cfg.devices > visible:
            problems.append(ConfigError(
                "devices", cfg.devices, f"at most {visible}: one rank per GPU and {visible} GPU(s) are visible to "
                                        f"this process (CUDA_VISIBLE_DEVICES)"))
    else:
        cores = len(os.sched_getaffinity(0))
        if cfg.devices > cores:
            problems.append(ConfigError(
                "devices", cfg.devices, f"at most {cores}: without CUDA each rank is a process computing on this "
                                        f"machine's {cores} CPU core(s)"))
        if cfg.kvcache.cache_implementation == "offloaded":
            problems.append(ConfigError(
                "kvcache", "cpu_transformers", "gpu or cpu on a machine without CUDA (transformers' offloaded "
                                               "cache streams over CUDA streams)"))
        if cfg.quant.mode != "none" and cfg.model.dtype == "float16":
            problems.append(ConfigError(
                "model.dtype", "float16", "float32 or bfloat16 for quantized weights without CUDA (DeepSpeed's "
                                          "fp16 dequantizer is CUDA-only)"))
    return problems


def check_environment(cfg: JobSpec, cuda: bool) -> None:
    """Raise :func:`environment_problems`, all of them in one error: the machine cannot run ``cfg``."""
    problems = environment_problems(cfg, cuda)
    if problems:
        raise every_problem(problems)


def prefer_cpu_accelerator(cuda: bool) -> None:
    """Without CUDA, name DeepSpeed's CPU accelerator before anything imports DeepSpeed (transformers does,
    for real weights), or DeepSpeed probes and warns on stdout."""
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def accelerator(cuda: bool):
    """DeepSpeed's accelerator for this machine (``cuda``: whether a CUDA device is usable): CUDA when
    present, else its CPU accelerator. Imports DeepSpeed."""
    prefer_cpu_accelerator(cuda)
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def check_dtype_supported(cfg: JobSpec, cuda: bool) -> None:
    """Refuse a dtype DeepSpeed's accelerator cannot compute in (fp16 on CPUs without fp16 kernels).

    Imports DeepSpeed, so it runs for real jobs only: a dry run may prepare a GPU config on any machine.
    """
    accel = accelerator(cuda)
    supported = {"float32": True, "float16": accel.is_fp16_supported(), "bfloat16": accel.is_bf16_supported()}
    if not supported[cfg.model.dtype]:
        allowed = " or ".join(dtype for dtype, ok in supported.items() if ok)
        shape = cfg.model.shape
        # A decoder layer holds about 12 h^2 weights: a billion of them is a model for a GPU, not a CPU.
        params = 12 * shape.hidden_size ** 2 * shape.layers
        meant_for_gpu = (f"; model={cfg.model.name} (about {params / 1e9:.0f}B parameters) is meant for a GPU, "
                         f"on this machine try model=tiny-opt" if accel.device_name() == "cpu" and params >= 1e9 else "")
        raise ConfigError("model.dtype", cfg.model.dtype,
                          f"{allowed} (the dtypes DeepSpeed's {accel.device_name()} accelerator computes in on "
                          f"this machine){meant_for_gpu}")
