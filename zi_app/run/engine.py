"""The accelerator and DeepSpeed's ZeRO-3 engine: one process, one rank unless a launcher says otherwise."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import sys
import warnings
from typing import Any, Dict, Optional

import torch

from zi_app.plan import preflight

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerator():
    """DeepSpeed's accelerator for this machine: CUDA when present, else its CPU accelerator."""
    return preflight.accelerator(torch.cuda.is_available())


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory collectives on its CPU accelerator (a JIT-built op)


def extensions_dir() -> str:
    """This environment's own folder for torch's JIT-built extensions (DeepSpeed's ``shm_comm`` and
    ``async_io``): ``<venv>/torch_extensions``, or, where the environment cannot be written (a system
    Python), ``~/.cache/torch_extensions/<its name>-<hash of its path>``. torch's default, one folder per
    Python version, is shared by every environment of that Python: two venvs with different torch builds
    rebuild each other's ops at every switch, silently (45-138 s jobs instead of 13 s)."""
    if os.access(sys.prefix, os.W_OK):
        return os.path.join(sys.prefix, "torch_extensions")
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~/.cache/torch_extensions"), f"{os.path.basename(sys.prefix)}-{key}")


def use_own_extensions_dir() -> None:
    """Point torch's JIT builds at :func:`extensions_dir` for this process and the ranks it starts, unless
    ``TORCH_EXTENSIONS_DIR`` is set already (the user's choice wins)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())


def shm_op_dir() -> str:
    """Where torch's JIT build keeps DeepSpeed's shm_comm op (``<TORCH_EXTENSIONS_DIR>/py3X_cpu/...``)."""
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for the folder, no public twin

    return _get_build_directory(SHM_OP, verbose=False)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Unless ``verbose``: hold back DeepSpeed's prints and INFO log lines (its compiler probes,
    ``... built successfully``); what it printed goes to this module's debug log."""
    if verbose:
        yield
        return
    printed, previous = io.StringIO(), logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logging.disable(previous)
        for line in printed.getvalue().splitlines():
            log.debug("%s", line)


def init_distributed(verbose: bool = False) -> None:
    """Start DeepSpeed's process group; a single process needs no launcher (rank 0 of 1 on loopback).

    ``verbose`` shows DeepSpeed's own log lines and compiler probes; otherwise only its warnings.
    """
    accelerator()
    use_own_extensions_dir()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed JIT-builds ops with the first `ninja` on PATH; the environment's own (a deepspeed
    # dependency) keeps one build cache valid whether or not the caller activated the venv.
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.INFO if verbose else logging.WARNING)
    # ZeRO-3's gather uses a torch.distributed name torch has deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        build_dir = shm_op_dir()
        if not os.path.isfile(os.path.join(build_dir, f"{SHM_OP}.so")):
            log.info("building DeepSpeed's shm_comm op once (about 30 s), cached in %s", build_dir)
    with _quiet(verbose):
        deepspeed.init_distributed(verbose=verbose)


def select_pin_backend(backend: str) -> None:
    """Where ZeRO-3 takes page-locked host memory for offloaded partitions (``memory.pin_backend``):
    DeepSpeed reads ``DS_PIN_MEMORY_BACKEND`` at every pin and every pinned-or-not check, so it is set for the
    job's process, which holds one job (and for the rank processes it starts)."""
    os.environ["DS_PIN_MEMORY_BACKEND"] = backend


def device() -> torch.device:
    """The device inputs must live on: this rank's GPU, or the CPU."""
    return torch.device(accelerator().current_device_name())


def cap_gpu_memory(budget_gib: float | None) -> None:
    """Limit this process's CUDA allocations to ``budget_gib`` so a large card stands in for a smaller one."""
    if budget_gib is None or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = min(1.0, budget_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    log.info("GPU memory capped at %.1f GiB (%.3f of the card)", budget_gib, fraction)


def initialize(model: torch.nn.Module, ds_config: Dict[str, Any],
               overlap_fetches: Optional[int] = None) -> torch.nn.Module:
    """Wrap ``model`` in a ZeRO-3 engine (parameter fetch hooks, offload) and return the module to call.

    Applies ``weight_quantization.post_init_quant`` when the config has it. ``overlap_fetches``: None
    keeps DeepSpeed's parameter coordinator as shipped; a number gives this engine the overlapping
    fetch path of :mod:`zi_app.run.fetch` with that many fetches in flight and its linear layers
    :mod:`zi_app.run.inference_linear`'s path (``memory.fetch=overlap``).
    """
    import deepspeed

    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.module.eval()
    if "post_init_quant" in ds_config.get("weight_quantization", {}):
        _apply_post_init_quantization(engine.module, ds_config)
    if overlap_fetches is not None:
        from zi_app.run import fetch, inference_linear

        fetch.install(engine, overlap_fetches)
        inference_linear.install(engine.module)
    return engine.module


def _apply_post_init_quantization(model: torch.nn.Module, ds_config: Dict[str, Any]) -> None:
    """Quantize the modules named in ``weight_quantization.post_init_quant`` (DeepSpeed's group-wise INT4/INT8)."""
    from deepspeed.inference.quantization.quantization import _init_group_wise_weight_quantization

    _init_group_wise_weight_quantization(model, ds_config)
