"""What this machine has, measured at the edge: its GPU (name, memory), host memory, free disk, and the
host-to-device bandwidth, measured once per machine and cached.

Nothing here creates a CUDA context in the calling process: the GPU is read through ``nvidia-smi`` and the
bandwidth is measured in a child process (``python -m zi_app.plan.hardware CACHE_DIR``), so a sweep's parent can
plan its jobs without holding GPU memory while they run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import time
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from zi_app.config.schema import JobSpec

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """The figures of the machine a job is planned for (None: unknown) and the speed model's constants.

    ``host_memory_bytes`` is what a job may use: the available memory when measured here, a preset's total.
    """

    name: str
    device_name: Optional[str]
    gpu_memory_bytes: Optional[int]
    host_memory_bytes: Optional[int]
    h2d_pinned_gbps: Optional[float]
    h2d_pageable_gbps: Optional[float]
    gpu_memory_gbps: Optional[float]
    gpu_tflops: Optional[float]
    stream_efficiency: float
    pageable_efficiency: float
    fetch_overhead_s: float
    param_overhead_s: float
    dequant_overhead_s: float
    post_quant_overhead_s: float
    step_overhead_s: float
    compute_efficiency: float
    memory_efficiency: float
    host_attention_gbps: float
    gpu_count: Optional[int] = None  # GPUs a job may span; None: any number
    gpu_peer_gbps: Optional[float] = None  # GPU-to-GPU GB/s per GPU, one direction
    # what limits host_memory_bytes, for messages: "available on this machine", "RLIMIT_AS ...", a preset's
    host_limit: str = ""

    @property
    def has_gpu_rates(self) -> bool:
        """Whether the speed of a job can be predicted: the link's and the GPU's rates are known."""
        return None not in (self.h2d_pinned_gbps, self.h2d_pageable_gbps, self.gpu_memory_gbps, self.gpu_tflops)


@dataclass(frozen=True)
class Gpu:
    """The first GPU this process would use."""

    name: str
    memory_bytes: int


def gpu() -> Optional[Gpu]:
    """This process's first visible GPU (``CUDA_VISIBLE_DEVICES`` respected), from nvidia-smi; None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[cell.strip() for cell in line.split(",")] for line in out.stdout.splitlines() if line.count(",") >= 3]
    if out.returncode != 0 or not rows:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        rows = [row for row in rows if first and first in (row[0], row[1])]
        if not rows:
            return None
    index, uuid, name, mib = rows[0][:4]
    return Gpu(name=name, memory_bytes=int(float(mib)) * 2**20)


def visible_gpus() -> List[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them when it is set, else every GPU
    nvidia-smi lists (its indexes); empty without a GPU."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = []
        for device in (d.strip() for d in env.split(",")):
            if not device or device.startswith("-"):  # CUDA ignores everything from an invalid entry on
                break
            gpus.append(device)
        return gpus
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def torch_gpu() -> Gpu:
    """This process's GPU as torch sees it (creates a CUDA context): for machines without nvidia-smi."""
    import torch

    return Gpu(name=torch.cuda.get_device_name(), memory_bytes=torch.cuda.mem_get_info()[1])


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_memory_left(root: Path = CGROUP_ROOT) -> Optional[int]:
    """Memory this process's cgroup (v2) and its ancestors still allow: the least ``memory.max`` minus
    ``memory.current`` on the way up; None without a limit (or without cgroup v2)."""
    try:
        line = next(line for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    group, left = root / line[3:].strip().lstrip("/"), None
    while True:
        try:
            limit = (group / "memory.max").read_text().strip()
            if limit != "max":
                room = int(limit) - int((group / "memory.current").read_text())
                left = room if left is None else min(left, room)
        except (OSError, ValueError):
            pass  # no memory controller at this level (the root has none)
        if group == root or root not in group.parents:
            return left
        group = group.parent


def host_memory_limit() -> Tuple[int, str]:
    """Host memory a new job can use now, and what sets it: the machine's available memory (psutil: free
    plus reclaimable cache) or, where lower, what this process's cgroup still allows (a container's or
    systemd unit's memory.max) or its address-space limit (RLIMIT_AS: ``prlimit --as``, ``ulimit -v``): past
    either the job dies loading, as an out-of-memory kill or a failed allocation."""
    import psutil

    limits = [(int(psutil.virtual_memory().available), "available on this machine")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "this process may map (RLIMIT_AS: prlimit --as, ulimit -v)"))
    left = cgroup_memory_left()
    if left is not None:
        limits.append((max(0, left), "left under this process's cgroup limit (memory.max)"))
    return min(limits)


def free_disk_bytes(path: str) -> Optional[int]:
    """Free bytes on the file system holding ``path`` (None when it does not exist)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _bandwidth_file(cache_dir: str, device_name: str) -> Path:
    name = f"h2d-{socket.gethostname()}-{device_name.replace(' ', '_')}.json"
    return Path(cache_dir).expanduser() / name


def median_seconds(work: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median wall seconds of ``work()`` over ``repeats`` calls after one untimed call; with ``cuda``, the GPU
    work each call queued is waited for inside its timing."""
    import torch

    work()
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def h2d_gbps(pinned: bool, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Median host-to-device copy bandwidth in GB/s (10^9 bytes/s) of a pinned or pageable buffer (creates a
    CUDA context)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / median_seconds(lambda: device.copy_(host, non_blocking=pinned), repeats, cuda=True) / 1e9


HOST_ATTENTION_DTYPES = ("float16", "bfloat16")
# GB/s assumed for kvcache.attention=host where it cannot be measured (a preset's machine, or no GPU here): a guess,
# between the 2-core CI machine's 14 (float16) and 33 (bfloat16) and what a server's cores should reach
HOST_ATTENTION_GBPS_ASSUMED = 30.0


def host_attention_gbps(dtype: str, batch: int = 16, heads: int = 56, context: int = 544, head_dim: int = 128,
                        repeats: int = 5) -> float:
    """Median GB/s of cached keys and values that one decode step's attention reads on this machine's CPU, every
    thread (torch's SDPA, one query token per sequence, OPT-30B's heads at its last step): the rate of
    kvcache.attention=host."""
    import torch

    keys = torch.randn(batch, heads, context, head_dim, dtype=getattr(torch, dtype))
    values, query = torch.randn_like(keys), torch.randn(batch, heads, 1, head_dim, dtype=keys.dtype)
    attend = torch.nn.functional.scaled_dot_product_attention
    seconds = median_seconds(lambda: attend(query, keys, values), repeats, cuda=False)
    return 2 * keys.numel() * keys.element_size() / seconds / 1e9


def measure_h2d_bandwidth(cache_dir: str) -> Dict[str, float]:
    """Measure pinned and pageable host-to-device GB/s in this process (creates a CUDA context) and the host's
    attention rate per dtype (``host_attention_<dtype>``), and cache them."""
    import torch

    bandwidth = {"pinned": h2d_gbps(pinned=True), "pageable": h2d_gbps(pinned=False),
                 **{f"host_attention_{dtype}": host_attention_gbps(dtype) for dtype in HOST_ATTENTION_DTYPES}}
    path = _bandwidth_file(cache_dir, torch.cuda.get_device_name())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bandwidth))
    return bandwidth


def cached_h2d_bandwidth(cache_dir: str) -> Optional[Dict[str, float]]:
    """Pinned and pageable host-to-device GB/s of this machine's GPU and its host's attention rates, measured
    once (in a child process) and cached under ``cache_dir``; None without a GPU or when the measurement failed.
    A cache written before the host's attention was measured is measured again."""
    device = gpu()
    if device is None:
        return None
    path = _bandwidth_file(cache_dir, device.name)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if f"host_attention_{HOST_ATTENTION_DTYPES[0]}" not in cached:
        subprocess.run([sys.executable, "-m", "zi_app.plan.hardware", cache_dir], check=False)
        cached = json.loads(path.read_text()) if path.is_file() else {}
    return cached or None


def matching_preset(device: Gpu) -> Optional[dict]:
    """The conf/hardware preset that stands for ``device`` (its device name in the GPU's, memory within 10%)."""
    from omegaconf import OmegaConf

    from zi_app.config.paths import conf_dir

    for path in sorted((conf_dir() / "hardware").glob("*.yaml")):
        preset = OmegaConf.to_container(OmegaConf.load(path))
        if same_gpu(preset, device):
            return preset
    return None


def same_gpu(preset, device: Gpu) -> bool:
    """Whether ``device`` is the GPU a hardware preset (its ``device_name`` and ``gpu_memory_gib``) names."""
    if not preset.get("device_name") or preset["device_name"].lower() not in device.name.lower():
        return False
    return preset.get("gpu_memory_gib") is None or abs(device.memory_bytes / GIB / preset["gpu_memory_gib"] - 1) < 0.1


def hardware(spec: JobSpec, cuda: bool = False) -> Hardware:
    """The figures ``spec.hardware`` plans for. A preset's are taken as given; ``hardware=auto`` fills each
    null figure from this machine: its GPU (nvidia-smi), available host memory (psutil), the cached
    bandwidth, the GPUs it may use (:func:`visible_gpus`), and the GPU's compute, memory and peer rates from
    the preset matching its name. Without a GPU the GPU figures stay None (any number of ranks: they run on
    the CPU) and no speed is predicted."""
    hw = dataclasses.asdict(spec.hardware)
    host_limit = ""  # a preset's: named by the plan
    if hw["name"] == "auto":
        device = gpu() or (torch_gpu() if cuda else None)
        if hw["host_memory_gib"] is None:
            host, host_limit = host_memory_limit()
            hw["host_memory_gib"] = host / GIB
        else:
            host_limit = "given"
        if device is not None:
            preset = matching_preset(device) or {}
            measured = (cached_h2d_bandwidth(spec.cache_dir) or {}
                        if None in (hw["h2d_pinned_gbps"], hw["h2d_pageable_gbps"], hw["host_attention_gbps"])
                        else {})
            found = {"device_name": device.name, "gpu_memory_gib": device.memory_bytes / GIB,
                     "h2d_pinned_gbps": measured.get("pinned"), "h2d_pageable_gbps": measured.get("pageable"),
                     "gpu_memory_gbps": preset.get("gpu_memory_gbps"), "gpu_tflops": preset.get("gpu_tflops"),
                     "gpu_count": len(visible_gpus()) or (1 if cuda else None),
                     "gpu_peer_gbps": preset.get("gpu_peer_gbps"),
                     "host_attention_gbps": measured.get(f"host_attention_{spec.model.dtype}")}
            hw.update({key: value for key, value in found.items() if hw[key] is None})
    if hw["host_attention_gbps"] is None:
        hw["host_attention_gbps"] = HOST_ATTENTION_GBPS_ASSUMED
    return Hardware(name=hw["name"], device_name=hw["device_name"], gpu_memory_bytes=_gib(hw["gpu_memory_gib"]),
                    host_memory_bytes=_gib(hw["host_memory_gib"]),
                    **{key: hw[key] for key in ("h2d_pinned_gbps", "h2d_pageable_gbps", "gpu_memory_gbps",
                                                "gpu_tflops", "gpu_count", "gpu_peer_gbps",
                                                "stream_efficiency", "pageable_efficiency",
                                                "fetch_overhead_s", "param_overhead_s",
                                                "dequant_overhead_s", "post_quant_overhead_s", "step_overhead_s",
                                                "compute_efficiency",
                                                "memory_efficiency", "host_attention_gbps")},
                    host_limit=host_limit)


def hardware_problem(hw: Hardware, cuda: bool) -> Optional[str]:
    """Why a real job cannot run with ``hw`` here: a preset for another GPU than this machine's; None if it can."""
    if hw.name == "auto":
        return None
    device = (gpu() or torch_gpu()) if cuda else None
    if device is None:
        return f"auto on this machine: hardware={hw.name} plans for a {hw.device_name} GPU and this machine has none"
    if not same_gpu({"device_name": hw.device_name, "gpu_memory_gib": (hw.gpu_memory_bytes or 0) / GIB or None},
                    device):
        return (f"auto on this machine: hardware={hw.name} plans for a {hw.device_name}, this machine has a "
                f"{device.name} ({device.memory_bytes / GIB:.0f} GiB); use hardware=auto, or dry_run=true / zi-plan "
                f"to plan for another machine")
    return None


def _gib(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value * GIB)


if __name__ == "__main__":
    measure_h2d_bandwidth(sys.argv[1])
