"""Host memory of offloaded weights (issue 20): ``memory.pin_backend=native`` page-locks each ZeRO-3 partition
at its own size through DeepSpeed's native pinned-memory backend instead of torch's caching host allocator,
which rounds every pinned partition up to a power of two; the planner predicts both.

The model is built in its own process by helpers/quant_probe.py exactly as the app builds it. On a CPU the
native backend page-locks with mlock (no CUDA registration), which is what these tests can see: every
partition flagged as DeepSpeed's, and the model computing the same logits as with torch's allocator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zi_app import validate
from zi_app.plan.job import plan_job
from zi_app.plan.memory import HOST_BASE_BYTES, host_parts, locked_bytes, pinned_bytes
from zi_app.plan.workload import workload

# Host memory is what these tests measure: new interpreters, as a user's job (tests/helpers/forkserver.py).
pytestmark = pytest.mark.fresh_interpreter

PROBE = Path(__file__).parents[1] / "helpers" / "quant_probe.py"
WORKLOAD = ["model=tiny-opt", "model.dtype=float32", "offload=cpu", "pin=true", "batch=2", "prompt_len=16"]


@pytest.fixture(scope="module")
def pinned(tmp_path_factory, run_python) -> dict:
    """Backend -> the probe's report for the same model, pinned by that backend."""
    import torch

    workdir = tmp_path_factory.mktemp("pinned")
    reports = {}
    for backend in ("torch", "native"):
        out = workdir / f"{backend}.pt"
        run_python([PROBE, out, *WORKLOAD, f"memory.pin_backend={backend}"], workdir).expect_success()
        reports[backend] = torch.load(out, weights_only=False)
    return reports


def test_native_backend_page_locks_every_partition(pinned):
    assert all(held["native_pinned"] for held in pinned["native"]["held"].values())
    assert not any(held["native_pinned"] for held in pinned["torch"]["held"].values())
    assert {name: held["bytes"] for name, held in pinned["native"]["held"].items()} == \
        {name: held["bytes"] for name, held in pinned["torch"]["held"].items()}


def test_both_backends_compute_the_same(pinned):
    assert pinned["native"]["logits"].equal(pinned["torch"]["logits"])


def test_partition_sizes_as_each_backend_holds_them():
    assert pinned_bytes(3 * 2**20) == 4 * 2**20 and locked_bytes(3 * 2**20) == 3 * 2**20
    assert locked_bytes(1) == 4096 and pinned_bytes(2**30 + 1) == 2**31


@pytest.mark.parametrize("model", ["opt-13b", "opt-30b"])
def test_planned_host_memory_is_the_offloaded_bytes_with_native_pinning(model, compose):
    """With every weight streamed, the native backend's predicted host RSS is the process's base plus the
    weights at their width (pages rounded), where torch's allocator is predicted well above it."""
    common = [f"model={model}", "hardware=h200", "batch=8", "memory.persistence=h", "offload=cpu", "pin=true"]
    native, torch_pinned = (plan_job(validate(compose(*common, f"memory.pin_backend={backend}")), cuda=True,
                                     here=False) for backend in ("native", "torch"))
    weights = 2 * sum(native.facts.param_numels)
    assert native.predicted_peak_host_bytes - HOST_BASE_BYTES == pytest.approx(weights, rel=0.001)
    assert torch_pinned.predicted_peak_host_bytes > 1.15 * native.predicted_peak_host_bytes
    assert native.predicted_peak_gpu_bytes == torch_pinned.predicted_peak_gpu_bytes


HOST_RULE = 1.10  # issue 20: host memory at most 1.10x the bytes that must be there, plus the process's base
# What loading adds beside any model's weights (modules imported, DeepSpeed's buffers): tiny-opt's 1 MB of
# weights came with 11 MiB.
HOST_SLACK_BYTES = 16 * 2**20
PLAN_TOLERANCE = 0.10  # issue 20: the planner's host prediction within 10% of the measured peak
OPT_1_3B_WIDE = ["model=opt-1.3b", "model.arch.num_hidden_layers=8", "model.dtype=bfloat16", "gen_len=2", "warmup=0",
                 "repeat=1"]  # opt-1.3b's layers, a third as many
# BLOOM's layers at a width of 64 with 32 heads: the prefill's attention scores (batch x heads x prompt^2, 14 bytes
# each in bfloat16 on a CPU: 1.75 GiB here) outweigh everything else the "device" holds
BLOOM_NARROW = ["model=bloom-176b", "model.arch.hidden_size=64", "model.arch.n_layer=2", "model.arch.n_head=32",
                "model.arch.vocab_size=1024", "model.dtype=bfloat16", "gen_len=2", "warmup=0", "repeat=1"]
HOST_CASES = {  # the four combinations of int4/int8 and the KV cache on the "device" or in our host cache, each once
    "opt-1.3b-wide int4 batch 8": [*OPT_1_3B_WIDE, "quant=int4", "batch=8", "prompt_len=64"],
    "opt-1.3b-wide int8 kvcache=cpu": [*OPT_1_3B_WIDE, "quant=int8", "kvcache=cpu", "batch=2", "prompt_len=16"],
    "tiny-opt int4 kvcache=cpu": ["model=tiny-opt", "quant=int4", "kvcache=cpu", "warmup=0", "repeat=1"],
    "tiny-opt int8": ["model=tiny-opt", "quant=int8", "warmup=0", "repeat=1"],
    # and a model that writes its attention out: planned without its scores, 0.58 GiB against 2.35 measured
    "bloom-narrow int4 batch 16 prompt 512": [*BLOOM_NARROW, "quant=int4", "batch=16", "prompt_len=512"],
}


@pytest.mark.parametrize("case", HOST_CASES)
def test_host_memory_is_the_quantized_weights_and_as_planned(case, job, compose):
    """On DeepSpeed's CPU accelerator, with random weights made and quantized as ZeRO-3 partitions them:

    - what loading adds to the job's host RSS (sampled just before and just after loading) is at most 1.10x the
      weights at their stored width, scales included (the planner's offloaded-weights term); before the heap
      was handed back (zi_app/run/heap.py) opt-1.3b int4 kept 1.4 GiB more than its 0.69 GiB of weights;
    - the job's peak host RSS (``peak_host_rss_bytes``) is the plan's within 10%. At batch 8 opt-1.3b int4 peaked at
      2.8 GiB, 1.4 more than planned, until its LM head's input was made contiguous (zi_app/run/lm_head.py)."""
    overrides = HOST_CASES[case]
    metrics = job(*overrides).metrics
    plan = plan_job(validate(compose(*overrides)), cuda=False)
    weights = host_parts(workload(plan.spec), plan.facts, plan.residency)["offloaded weights"]
    added = metrics["host_rss_loaded_bytes"] - metrics["host_rss_before_load_bytes"]
    assert added <= HOST_RULE * weights + HOST_SLACK_BYTES, (added / 2**20, weights / 2**20)
    peak, planned = metrics["peak_host_rss_bytes"], plan.predicted_peak_host_bytes
    assert abs(planned - peak) <= PLAN_TOLERANCE * peak, (planned / 2**30, peak / 2**30)


def test_a_jobs_peak_is_its_own_not_its_parents(run_python, mlflow_store, tmp_path):
    """A job started by a process holding 1 GiB (a sweep's driver, a test worker) reports its own peak host
    RSS: Linux's ``ru_maxrss`` carried the parent's resident set into the child at exec, and jobs reported it."""
    parent = ("import subprocess, sys\n"
              "held = bytearray(2**30)\n"
              "held[::4096] = b'x' * len(held[::4096])\n"  # every page touched: resident
              "sys.exit(subprocess.call([sys.executable, '-m', 'zi_app', *sys.argv[1:]]))\n")
    run_python(["-c", parent, "model=tiny-opt", "prompt_len=8", "gen_len=2", "warmup=0", "repeat=1"],
               tmp_path).expect_success()
    [record] = mlflow_store.job_runs()
    assert record.data.metrics["peak_host_rss_bytes"] < 0.9 * 2**30
