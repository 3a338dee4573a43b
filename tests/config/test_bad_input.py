"""Bad input is refused before any model loads: a message naming the key, the bad value and what is
allowed, no stack trace, and a non-zero exit.

Most cases run the real command line (``python -m zi_app dry_run=true <bad override>``: composition,
schema and preflight checks, ~4 s each). Checks of the machine itself (libaio, DeepSpeed's version,
CUDA) call the real preflight functions with the machine fact replaced by the failing one, so they
hold on any machine.
"""

from __future__ import annotations

import pytest

from zi_app import ConfigError, validate
from zi_app.plan import preflight

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

# (overrides, key, bad value as printed, what is allowed as printed); {tmp} is the test's directory.
BAD_OVERRIDES = [
    (["batch=0"], "batch", "0", "a positive integer"),
    (["batch=abc"], "batch", "abc", "could not be converted to Integer"),
    (["prompt_len=0"], "prompt_len", "0", "a positive integer"),
    (["gen_len=-1"], "gen_len", "-1", "a positive integer"),
    (["gen_len=1.5"], "gen_len", "1.5", "could not be converted to Integer"),
    (["warmup=-1"], "warmup", "-1", "an integer >= 0"),
    (["model=tiny-llama", "prompt_len=2000", "gen_len=49"], "prompt_len", "2000",
     "prompt_len + gen_len = 2049 exceeds model tiny-llama's 2048 positions"),
    (["quant=int4", "quant.bits=3"], "quant.bits", "3", "4 or 8"),
    (["quant=int8", "quant.symmetric=true"], "quant.symmetric", "True", "false (DeepSpeed implements asymmetric only)"),
    (["quant=int4", "quant.group_size=60"], "quant.group_size", "60", "a multiple of 8 that divides the hidden size 128"),
    (["quant=int4", "quant.group_size=0"], "quant.group_size", "0", "a positive integer"),
    (["quant=int4-post", "model.dtype=float32"], "quant.mode", "post", "needs model.dtype=float16"),
    (["offload=disk"], "offload", "disk", "one of cpu, none, nvme"),
    (["offload.device=disk"], "offload.device", "disk", "one of none, cpu, nvme"),
    (["model=pretrained", "model.path={tmp}/no-such-model"], "model.path", "{tmp}/no-such-model", "an existing directory holding config.json"),
    (["model=tiny-opt", "model.path={tmp}"], "model.weights", "random", "'pretrained' when model.path is set"),
    (["model=gpt-5"], "model", "gpt-5", "one of bloom-176b, llama-2-70b, opt-1.3b"),
    (["model.loader=disk"], "model.loader", "disk", "one of auto, files, transformers"),
    (["model=pretrained", "model.path=facebook/opt-125m", "model.loader=files"], "model.loader", "files",
     "auto or transformers for a hub id"),
    (["model.dtype=float8"], "model.dtype", "float8", "one of float32, float16, bfloat16"),
    (["pin=maybe"], "pin", "maybe", "is not a valid bool"),
    (["memory.persistence=most"], "memory.persistence", "most", "'h' (h elements), 'hh' (h*h+1)"),
    (["tracking.connect_timeout_s=-5"], "tracking.connect_timeout_s", "-5.0", "seconds >= 0 to keep retrying"),
]


@pytest.mark.parametrize("overrides,key,value,allowed", BAD_OVERRIDES,
                         ids=[" ".join(case[0]) for case in BAD_OVERRIDES])
def test_bad_override_is_refused_with_a_clear_message(overrides, key, value, allowed, run_app, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    run = run_app("dry_run=true", *(o.format(tmp=tmp_path) for o in overrides))
    message = run.stderr
    assert run.returncode != 0, run.tail()
    assert "Traceback" not in run.output, run.tail()
    assert key in message and value.format(tmp=tmp_path) in message and allowed in message, run.tail()
    assert not run.stdout.strip().startswith("{"), "a DeepSpeed config was printed for a bad config"


def test_bad_value_in_a_real_run_exits_2_before_loading(run_app, mlflow_store):
    """Without dry_run the same check stops the job before any model loads: exit 2, the message on stderr,
    and the job's MLflow run marked FAILED as an invalid config, with no generation artifact."""
    run = run_app("batch=0", "prompt_len=16", "gen_len=4")
    assert run.returncode == 2, run.tail()
    assert "batch=0 is not allowed: a positive integer" in run.stderr
    assert "Traceback" not in run.output and "loading" not in run.output, run.tail()
    [job] = mlflow_store.job_runs()
    assert job.info.status == "FAILED"
    assert job.data.tags["zi.failure_kind"] == "invalid-config"
    assert not mlflow_store.artifact_path(job, "generation.json").exists()


def refusal(check, *args) -> ConfigError:
    """The ConfigError ``check(*args)`` raises (failing the test when it raises none)."""
    with pytest.raises(ConfigError) as raised:
        check(*args)
    return raised.value


def test_deepspeed_older_than_0_10_3_is_refused():
    error = refusal(preflight.check_deepspeed_version, "0.10.2")
    assert (error.key, error.value) == ("deepspeed", "0.10.2")
    assert ">= 0.10.3" in str(error)
    preflight.check_deepspeed_version("0.10.3")
    preflight.check_deepspeed_version()  # the installed one


def test_nvme_path_this_machine_lacks_is_refused(compose, tmp_path):
    """Whether the NVMe directory exists and is writable is a fact of the machine that runs the job."""
    (tmp_path / "a-file").write_text("not a directory")
    for path, allowed in ((tmp_path / "missing", "an existing directory"), (tmp_path / "a-file", "an existing directory"),
                          # nobody may create files in /proc/sys, root included (chmod would not stop root)
                          ("/proc/sys", "a directory this user can write to")):
        problems = preflight.environment_problems(validate(compose("offload=nvme", f"offload.nvme_path={path}")), False)
        assert [(p.key, p.value) for p in problems if p.key == "offload.nvme_path"] == [("offload.nvme_path", str(path))]
        assert allowed in str(problems[-1])


def test_nvme_without_libaio_is_refused(compose, tmp_path, monkeypatch):
    """libaio's header is looked for where Debian/Ubuntu put it; pointing the lookup at an empty
    directory is what a machine without libaio-dev looks like to the check."""
    cfg = validate(compose("offload=nvme", f"offload.nvme_path={tmp_path}"))
    assert preflight.libaio_available(), "this machine should have libaio-dev (the NVMe test needs it)"
    preflight.check_environment(cfg, cuda=False)
    monkeypatch.setattr(preflight, "_LIBAIO_HEADERS", (str(tmp_path / "libaio.h"),))
    error = refusal(preflight.check_environment, cfg, False)
    assert (error.key, error.value) == ("offload.device", "nvme")
    assert "libaio is missing (apt-get install libaio-dev)" in str(error)


def test_transformers_offloaded_kv_cache_without_cuda_is_refused(compose):
    """kvcache=cpu_transformers is transformers' offloaded cache, which streams over CUDA streams; ours
    (kvcache=cpu) runs its copies in order on DeepSpeed's CPU accelerator."""
    error = refusal(preflight.check_environment, validate(compose("kvcache=cpu_transformers")), False)
    assert (error.key, error.value) == ("kvcache", "cpu_transformers")
    assert "gpu or cpu on a machine without CUDA" in str(error)
    preflight.check_environment(validate(compose("kvcache=cpu")), False)


def test_fp16_quantization_without_cuda_is_refused(compose):
    """DeepSpeed's fp16 dequantizer is a CUDA kernel: on a CPU, quantized weights need float32/bfloat16."""
    error = refusal(preflight.check_environment, validate(compose("quant=int4", "model.dtype=float16")), False)
    assert (error.key, error.value) == ("model.dtype", "float16")
    assert "float32 or bfloat16" in str(error)
    preflight.check_environment(validate(compose("quant=int4", "model.dtype=bfloat16")), False)


def test_dtype_the_accelerator_cannot_compute_in_is_refused_in_a_real_run(run_app, run_python, tmp_path):
    """A real job asks DeepSpeed's accelerator which dtypes it computes in, before loading anything; a CPU
    without fp16 kernels (this project's machines) refuses float16 with the key, value and the dtypes it has."""
    probe = run_python(["-c", "from zi_app.run.engine import accelerator; a = accelerator(); "
                              "print(a.is_fp16_supported(), a.is_bf16_supported())"], tmp_path)
    fp16, bf16 = (word == "True" for word in probe.stdout.split()[-2:])
    run = run_app("model.dtype=float16", "prompt_len=16", "gen_len=4", "warmup=0", "repeat=1")
    if fp16:
        assert run.returncode == 0, run.tail()
    else:
        assert run.returncode == 2, run.tail()
        assert ("model.dtype='float16' is not allowed: float32" + (" or bfloat16" if bf16 else "") +
                " (the dtypes DeepSpeed's cpu accelerator computes in on this machine)") in run.stderr
        assert "Traceback" not in run.output and "meant for a GPU" not in run.stderr
        # A preset for a GPU says so, and what to run here instead.
        large = run_app("model=opt-30b", "prompt_len=16", "gen_len=4", "warmup=0", "repeat=1")
        assert large.returncode == 2, large.tail()
        assert "model=opt-30b (about 30B parameters) is meant for a GPU, on this machine try model=tiny-opt" \
            in large.stderr
