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


def test_kv_dequant_times_a_kept_layer_on_the_cpu(run_python, tmp_path):
    """benchmarks/kv_dequant.py runs on a CPU-only machine (no link to time): one row per batch and kernel (here
    PyTorch's), the kept layer's dequantization and the GPU cache's concatenation each timed, the cached elements
    counted, no difference from PyTorch's values."""
    script = COMPARE.with_name("kv_dequant.py")
    run = run_python([script, "--hidden", "256", "--heads", "4", "--batch", "2", "3", "--context", "70",
                      "--repeat", "2"], tmp_path, timeout=300)
    assert run.returncode == 0, run.tail()
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "batch" not in line]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [("2", "torch"), ("3", "torch")]
    for row in rows:
        batch = int(row[0])
        assert float(row[2]) == round(2 * batch * 4 * 70 * 64 / 1e6, 1)  # keys and values, heads, tokens, head size
        assert float(row[4]) > 0 and float(row[7]) == 0 and float(row[8]) > 0 and not row[9].strip()
