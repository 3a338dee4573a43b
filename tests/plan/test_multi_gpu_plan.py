"""Jobs spanning several GPUs (``devices``), before they run: the planner's ZeRO-3 arithmetic for N ranks on
real model facts, ``zi-plan`` over devices=1,2 (a real subprocess), refusals naming ``devices`` (the hardware
planned for, the GPUs visible here, the GPUs a sweep has), and the process_per_job launcher handing a job
its GPUs as a set while other jobs run on the rest (real multiruns)."""

from __future__ import annotations

import json

import pytest
from plugins.test_launcher import _records, _run_app  # tests/ is on sys.path (conftest)

import zi_app
from zi_app.plan import memory as planner, preflight
from zi_app.plan.job import plan_job
from zi_app import validate

GIB = 2**30
# OPT-30B under a 24 GiB budget on the H200: most weights stream over the host link every decode step.
STREAMING = ("model=opt-30b", "batch=8", "hardware=h200", "memory.gpu_budget_gib=24")


def _plan(compose, *overrides):
    return plan_job(validate(compose(*overrides)), cuda=True, here=False)


@pytest.mark.quick
def test_offloaded_weights_are_partitioned_across_ranks(compose):
    """Two ranks: each streams half the offloaded bytes over its own link and all-gathers the other half; the
    GPU peak per rank is unchanged (resident weights whole on each); host memory holds the weights once,
    with one more process base; the link-bound job more than doubles its tokens/s (twice the prompts, each
    step half the copying)."""
    one, two = _plan(compose, *STREAMING, "devices=1"), _plan(compose, *STREAMING, "devices=2")
    assert one.fits and two.fits, (one.reason, two.reason)
    streamed = one.predicted_streamed_bytes_per_step
    assert streamed > 40e9 and one.predicted_peer_bytes_per_step == 0
    assert two.predicted_streamed_bytes_per_step == -(-streamed // 2)
    assert two.predicted_peer_bytes_per_step == streamed - two.predicted_streamed_bytes_per_step
    assert two.predicted_peak_gpu_bytes == one.predicted_peak_gpu_bytes
    extra_host = two.predicted_peak_host_bytes - one.predicted_peak_host_bytes
    assert planner.HOST_BASE_BYTES <= extra_host < planner.HOST_BASE_BYTES + 0.05 * one.predicted_peak_host_bytes
    assert two.predicted_decode_step_s < 0.6 * one.predicted_decode_step_s
    assert two.predicted_tokens_per_sec > 2 * one.predicted_tokens_per_sec
    assert two.predicted_metrics()["predicted_peer_bytes_per_step"] == two.predicted_peer_bytes_per_step


@pytest.mark.quick
def test_a_slow_peer_link_bounds_the_step(compose):
    """The all-gather and the host copies overlap: at 1 GB/s between GPUs the peers' half, not the own
    link's, sets the step, and two ranks are slower per step than one."""
    one = _plan(compose, *STREAMING, "devices=1", "hardware.gpu_peer_gbps=1")
    slow = _plan(compose, *STREAMING, "devices=2", "hardware.gpu_peer_gbps=1")
    assert slow.predicted_decode_step_s >= slow.predicted_peer_bytes_per_step / 1e9
    assert slow.predicted_decode_step_s > one.predicted_decode_step_s


@pytest.mark.quick
def test_resident_weights_are_not_gathered(compose):
    """With every weight on the GPU (offload=none) ranks stream and gather nothing: each holds the model."""
    two = _plan(compose, "model=opt-1.3b", "offload=none", "hardware=h200", "devices=2")
    assert two.fits, two.reason
    assert two.predicted_streamed_bytes_per_step == 0 and two.predicted_peer_bytes_per_step == 0
    assert two.predicted_peak_gpu_bytes > 2.4 * GIB  # the whole fp16 model on each rank


@pytest.mark.quick
def test_an_offloaded_kv_cache_is_each_ranks_own(compose):
    """kvcache=cpu with resident weights: each rank copies its own batch's cache over its own link, whole,
    gathers nothing, and holds its own host buffer."""
    overrides = ("model=opt-1.3b", "offload=none", "kvcache=cpu", "batch=8", "hardware=h200")
    one, two = _plan(compose, *overrides), _plan(compose, *overrides, "devices=2")
    assert one.predicted_streamed_bytes_per_step > 0 and two.predicted_peer_bytes_per_step == 0
    assert two.predicted_streamed_bytes_per_step == one.predicted_streamed_bytes_per_step
    assert two.predicted_peak_host_bytes == 2 * one.predicted_peak_host_bytes


@pytest.mark.quick
def test_ranks_need_the_peer_rate_for_a_speed(compose):
    """Without hardware.gpu_peer_gbps the speed of several ranks is unknown (None), one rank's is not."""
    assert _plan(compose, *STREAMING, "hardware.gpu_peer_gbps=null", "devices=2").predicted_tokens_per_sec is None
    assert _plan(compose, *STREAMING, "hardware.gpu_peer_gbps=null").predicted_tokens_per_sec is not None


@pytest.mark.quick
def test_devices_beyond_the_hardware_do_not_fit(compose):
    plan = _plan(compose, *STREAMING, "hardware.gpu_count=2", "devices=4")
    [problem] = [p for p in plan.problems if p.key == "devices"]
    assert not plan.fits and "devices=4 is not allowed: at most 2: hardware=h200 has 2 GPU(s)" in str(problem)
    assert _plan(compose, *STREAMING, "hardware.gpu_count=2", "devices=2").fits
    with pytest.raises(zi_app.ConfigError, match="hardware.gpu_count=0 is not allowed: a positive integer"):
        _plan(compose, "hardware.gpu_count=0")
    with pytest.raises(zi_app.ConfigError, match="hardware.gpu_peer_gbps=-1"):
        _plan(compose, "hardware.gpu_peer_gbps=-1")


@pytest.mark.quick
def test_devices_beyond_the_visible_gpus_are_refused_on_cuda(compose):
    """On CUDA a job asking more ranks than this process sees GPUs is refused before loading; on the CPU
    accelerator ranks are processes on the CPU and any number runs."""
    import torch

    visible = torch.cuda.device_count()
    cfg = validate(compose(f"devices={visible + 1}"))
    [problem] = [p for p in preflight.environment_problems(cfg, cuda=True) if p.key == "devices"]
    assert str(problem).startswith(f"devices={visible + 1} is not allowed: at most {visible}: ")
    assert f"{visible} GPU(s) are visible to this process" in str(problem)
    assert not [p for p in preflight.environment_problems(cfg, cuda=False) if p.key == "devices"]


def test_zi_plan_over_devices(run_python, tmp_path):
    """zi-plan devices=1,2: the JSON rows carry devices and the peer bytes, the table shows both columns
    and marks two ranks best for the link-bound job; a third rank on a 2-GPU machine does not fit."""
    run = run_python(["-m", "zi_app.zi_plan", "--json", *STREAMING, "devices=1,2"], tmp_path).expect_success()
    one, two = json.loads(run.stdout)
    assert (one["devices"], two["devices"]) == (1, 2)
    assert one["predicted_peer_bytes_per_step"] == 0 < two["predicted_peer_bytes_per_step"]
    assert two["predicted_tokens_per_sec"] > 2 * one["predicted_tokens_per_sec"]
    table = run_python(["-m", "zi_app.zi_plan", *STREAMING, "hardware.gpu_count=2", "devices=1,2,3"],
                       tmp_path).expect_success().stdout
    header, _, *rows = table.splitlines()
    assert "devices" in header.split() and "peer GB/step" in header, table
    [best] = [row for row in rows if row.startswith("best")]
    assert "devices=2" in best and "NO" in rows[2], table
    assert "devices=3 is not allowed: at most 2" in table


def test_a_job_takes_its_devices_gpus_while_others_run_beside_it(tmp_path):
    """Three GPUs, jobs asking one or two: a two-GPU job sees two ids at once, no GPU serves two jobs at
    a time, and a one-GPU job runs on the third GPU beside a two-GPU job."""
    proc = _run_app(tmp_path, "+devices=2,1", "x=3,5", "sleep=3", "hydra.launcher.gpus=[a,b,c]")
    assert proc.returncode == 0, proc.stderr
    records = list(_records(tmp_path / "sweep").values())
    assert len(records) == 4
    assert sorted(len(r["gpu"].split(",")) for r in records) == [1, 1, 2, 2]
    for r in records:
        beside = [o for o in records if o["start"] < r["end"] and r["start"] < o["end"]]
        ids = [gpu for o in beside for gpu in o["gpu"].split(",")]
        assert len(ids) == len(set(ids)) <= 3, beside
    assert any(len(r["gpu"].split(",")) == 2 and any(len(o["gpu"].split(",")) == 1 and o["start"] < r["end"]
                                                      and r["start"] < o["end"] for o in records)
               for r in records)


def test_sweep_refuses_more_devices_than_its_gpus(run_app, mlflow_store, tmp_path):
    """A sweep with two GPUs (fake ids on a CPU machine): the devices=3 job is refused in the parent, without
    a process, as a FAILED invalid-config run naming devices, 3 and the 2 GPUs; the devices=2 job runs with
    both ids."""
    run = run_app("devices=2,3", "hydra.launcher.gpus=[a,b]", "prompt_len=8", "gen_len=2", "warmup=0",
                  "repeat=1", multirun=True)
    assert "1 will be refused" in run.stdout, run.tail()
    assert "#1 devices=3: devices=3 is not allowed: at most 2" in run.stdout
    assert "#0 devices=2: COMPLETED" in run.stdout and "GPU a,b)" in run.stdout
    jobs = {job.data.params["devices"]: job for job in mlflow_store.job_runs()}
    refused, ran = jobs["3"], jobs["2"]
    assert refused.info.status == "FAILED" and refused.data.tags["zi.failure_kind"] == "invalid-config"
    assert "this sweep has 2 GPU(s)" in refused.data.tags["zi.failure_message"]
    assert ran.info.status == "FINISHED", run.tail()
    assert len(list(tmp_path.rglob(".hydra"))) == 1
