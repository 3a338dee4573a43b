"""The side-by-side benchmark measures on a CUDA GPU only: on a machine without one it refuses at once,
saying why, and leaves no results or runs behind."""

from __future__ import annotations

from pathlib import Path

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


def test_compare_refuses_without_cuda(run_python, tmp_path):
    run = run_python([COMPARE, "--title", "t", "--common", "model=tiny-opt", "--variant", "reference",
                      "memory=reference", "--out", tmp_path / "result"], tmp_path, timeout=120)
    assert run.returncode != 0, run.tail()
    assert "measures ZeRO-Inference on a CUDA GPU" in run.stderr and "torch.cuda.is_available() is False" in run.stderr
    assert not (tmp_path / "mlruns").exists() and not list(tmp_path.glob("result*"))


def test_plain_gpu_baseline_refuses_without_cuda(run_python, tmp_path):
    plain = COMPARE.with_name("plain_gpu.py")
    run = run_python([plain, "--run-dir", tmp_path / "run", "model=tiny-opt"], tmp_path, timeout=120)
    assert run.returncode != 0, run.tail()
    assert "loads the model onto a CUDA GPU" in run.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "run").exists()
