"""The plan counts a job's whole host footprint and this process's limits (issue 24, items 3 and 9): on the CPU
accelerator the KV cache and activations are host memory, an address-space limit (``prlimit --as``) or a
cgroup's ``memory.max`` is the host memory a job has, and a refusal names every problem in its one line.
Each is run as a user runs it: the real command in a real process, under a real limit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zi_app.plan.hardware import cgroup_memory_left


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_an_absurd_batch_on_the_cpu_does_not_fit(run_python, tmp_path):
    """``zi-plan batch=100000000`` on a machine without CUDA: its KV cache alone is far beyond the host."""
    result = run_python(["-m", "zi_app.zi_plan", "batch=100000000"], tmp_path).expect_success()
    assert "batch=100000000  NO" in result.stdout, result.tail()
    assert "batch=100000000 is not allowed: a batch that fits: on the CPU the KV cache" in result.stdout


def test_the_planned_host_memory_of_a_cpu_job_grows_with_its_batch(compose):
    from zi_app import validate
    from zi_app.plan.job import plan_job

    small, large = (plan_job(validate(compose(f"batch={batch}")), cuda=False) for batch in (1, 64))
    kv_and_activations = large.residency.predicted_peak_bytes - small.residency.predicted_peak_bytes
    assert kv_and_activations > 0
    assert large.predicted_peak_host_bytes - small.predicted_peak_host_bytes == kv_and_activations


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs util-linux's prlimit")
def test_a_job_under_an_address_space_limit_is_refused_before_loading(run_python, tmp_path, mlflow_store):
    """opt-1.3b in bf16 (2.6 GB of weights) under ``prlimit --as=2500000000``: refused in one line, exit 2, its
    run FAILED as an invalid config, before any weight is made."""
    result = run_python(["-c", "import os, sys; os.execvp('prlimit', ['prlimit', '--as=2500000000', sys.executable, "
                               "'-m', 'zi_app', 'model=opt-1.3b', 'model.dtype=bfloat16', 'prompt_len=8', 'gen_len=2'])"],
                        tmp_path)
    assert result.returncode == 2, result.tail()
    [line] = error_lines(result.stderr)
    assert "this process may map (RLIMIT_AS" in line and "2.3 GiB" in line, line
    assert "Traceback" not in result.output and "loading" not in result.output, result.tail()
    [job] = mlflow_store.job_runs()
    assert job.info.status == "FAILED" and job.data.tags["zi.failure_kind"] == "invalid-config"


def test_the_memory_a_cgroup_still_allows_is_the_least_on_the_way_up(tmp_path):
    """A cgroup v2 tree laid out as the kernel does: the process's group and its parent each limit memory."""
    own = next(line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
               if line.startswith("0::"))
    group = tmp_path / own.lstrip("/")
    group.mkdir(parents=True, exist_ok=True)
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text("100\n")
    assert cgroup_memory_left(tmp_path) is None
    (group / "memory.max").write_text(f"{8 * 2**30}\n")
    (group / "memory.current").write_text(f"{2**30}\n")
    assert cgroup_memory_left(tmp_path) == 7 * 2**30
    if group != tmp_path:
        (group.parent / "memory.max").write_text(f"{3 * 2**30}\n")
        (group.parent / "memory.current").write_text(f"{2 * 2**30}\n")
        assert cgroup_memory_left(tmp_path) == 2**30


def test_a_refusal_names_every_problem_in_one_line(run_python, tmp_path):
    """``offload=nvme offload.nvme_path=/nonexistent`` where libaio is missing: both problems, one line. The
    machine is made one without libaio the way the check sees it (its header looked for where none is)."""
    script = ("import sys; from zi_app.plan import preflight; "
              "preflight._LIBAIO_HEADERS = ('/nonexistent/libaio.h',); "
              "sys.argv = ['zi', 'offload=nvme', 'offload.nvme_path=/nonexistent', 'prompt_len=8', 'gen_len=2']; "
              "from zi_app.app import cli; cli()")
    result = run_python(["-c", script], tmp_path)
    assert result.returncode == 2, result.tail()
    [line] = error_lines(result.stderr)
    assert "offload.device='nvme' is not allowed: cpu or none on this machine: libaio is missing" in line
    assert "; offload.nvme_path='/nonexistent' is not allowed: an existing directory" in line
    assert "Traceback" not in result.output and "loading" not in result.output, result.tail()
