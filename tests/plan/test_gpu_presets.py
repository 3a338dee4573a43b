"""Speed figures for common NVIDIA GPUs: each preset in conf/hardware is the one ``hardware=auto`` picks for the
GPU name nvidia-smi reports, and on an H100 80GB (a fake nvidia-smi reporting one, its link rates cached as
the app caches them) ``hardware=auto`` predicts tokens/s."""

from __future__ import annotations

import json
import os
import stat

import pytest

from zi_app import validate
from zi_app.plan import hardware as hw
from zi_app.plan.job import plan_job

# (nvidia-smi's name and memory.total in MiB, the preset that stands for it)
GPUS = [("NVIDIA H100 80GB HBM3", 81559, "h100-80gb"), ("NVIDIA H100 PCIe", 81559, "h100-pcie"),
        ("NVIDIA H200", 143771, "h200"), ("NVIDIA A100-SXM4-80GB", 81920, "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 40960, "a100-40gb"), ("NVIDIA L40S", 46068, "l40s"),
        ("NVIDIA A10G", 23028, "a10g"), ("NVIDIA RTX 6000 Ada Generation", 49140, "rtx6000-ada"),
        ("NVIDIA RTX A6000", 49140, "a6000"), ("NVIDIA GeForce RTX 4090", 24564, "rtx4090")]


@pytest.mark.quick
@pytest.mark.parametrize("name, mib, preset", GPUS, ids=[preset for *_, preset in GPUS])
def test_each_common_gpu_has_its_preset(name, mib, preset):
    found = hw.matching_preset(hw.Gpu(name, mib * 2**20))
    assert found is not None and found["name"] == preset
    assert found["gpu_tflops"] > 0 and found["gpu_memory_gbps"] > 0


@pytest.mark.quick
def test_auto_on_an_h100_predicts_tokens_per_second(compose, tmp_path, monkeypatch):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\ncase "$*" in *index,uuid*) echo "0, GPU-1, NVIDIA H100 80GB HBM3, 81559";; '
                   '*) echo 0;; esac\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cache = tmp_path / "cache"
    measured = hw._bandwidth_file(str(cache), "NVIDIA H100 80GB HBM3")  # as the app's probe leaves it
    measured.parent.mkdir(parents=True)
    measured.write_text(json.dumps({"pinned": 53.0, "pageable": 17.0, "host_attention_float16": 41.0,
                                    "host_attention_bfloat16": 45.0}))

    spec = validate(compose("hardware=auto", "model=opt-13b", "batch=8", f"cache_dir={cache}"))
    machine = hw.hardware(spec)
    assert machine.has_gpu_rates and machine.gpu_tflops == 989 and machine.gpu_memory_gbps == 3350
    assert machine.h2d_pinned_gbps == 53.0 and machine.host_attention_gbps == 41.0  # opt-13b is float16
    assert plan_job(spec, cuda=False).predicted_tokens_per_sec > 0


def test_the_hosts_attention_rate_is_measured_or_assumed(compose):
    """``kvcache.attention=host``'s rate: this CPU's, measured by the probe the app caches (a real SDPA over a
    small cache); a preset's machine cannot be measured from here, so the assumed rate stands unless given."""
    rate = hw.host_attention_gbps("bfloat16", batch=2, heads=4, context=64, head_dim=32, repeats=3)
    assert 0 < rate < 10_000
    preset = hw.hardware(validate(compose("hardware=h200")))
    assert preset.host_attention_gbps == hw.HOST_ATTENTION_GBPS_ASSUMED
    assert hw.hardware(validate(compose("hardware=h200", "hardware.host_attention_gbps=80"))).host_attention_gbps == 80
