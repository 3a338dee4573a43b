"""The quantized KV cache's fused Triton dequantization (kvcache.dequant=triton) against PyTorch's kernels, run in
Triton's interpreter (no GPU here), in the layouts the cache hands it, and how ``auto`` is planned."""

import importlib

import pytest

from zi_app import validate
from zi_app.plan.job import plan_job

pytestmark = pytest.mark.quick


@pytest.fixture
def kv_kernels(monkeypatch):
    """zi_app.run.kv_kernels with its kernel built for Triton's interpreter (which reads the setting when the
    kernel is defined, at import)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.import_module("zi_app.run.kv_kernels")
    return importlib.reload(module)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype,head_dim,config", [("float16", 128, None), ("float16", 16, (256, 8)),
                                                   ("bfloat16", 128, (16, 4)), ("float32", 32, None)])
def test_fused_dequantization_writes_pytorchs_values_where_it_is_told(kv_kernels, bits, dtype, head_dim, config):
    """A kept layer's cached prefix (a strided view of its head-major buffer) into the front of attention's
    tensor, and a slot's token-major chunk: the values of PyTorch's kernels (float16 to the bit; float32 to its
    rounding, PyTorch's CPU kernel fusing the multiply and add; bfloat16 to one unit in the last place, which the
    interpreter's conversion truncates where the GPU rounds), and nothing written past the tokens given; with blocks
    of rows the autotuner may pick (``config``) as with the interpreter's."""
    import torch

    from zi_app.config.checks import kv_quant_group
    from zi_app.run.kvcache import dequantize, quantize

    dtype = getattr(torch, dtype)
    group = kv_quant_group(head_dim)
    generator = torch.Generator().manual_seed(bits)
    cached, max_len = 70, 96
    values = (torch.randn(2, 3, 4, cached, head_dim, generator=generator) * 3).to(dtype)
    codes = torch.zeros(2, 3, 4, max_len, head_dim * bits // 8, dtype=torch.uint8)
    scales = torch.zeros(2, 3, 4, max_len, head_dim // group, 2, dtype=dtype)
    quantize(values, bits, codes[:, :, :, :cached], scales[:, :, :, :cached])
    expected = torch.empty_like(values)
    dequantize(codes[:, :, :, :cached], scales[:, :, :, :cached], bits, expected)
    assert (expected - values).abs().max() > 0  # quantized: the comparison below is not with the input

    both = torch.full((2, 3, 4, cached + 1, head_dim), 7.0, dtype=dtype)  # the new token's place stays as it was
    kv_kernels.dequantize(codes[:, :, :, :cached], scales[:, :, :, :cached], bits, both[:, :, :, :cached], config)
    slot = torch.full((cached, 2, 3, 4, head_dim), 7.0, dtype=dtype)
    kv_kernels.dequantize(codes[:, :, :, :cached].permute(3, 0, 1, 2, 4).contiguous(),
                          scales[:, :, :, :cached].permute(3, 0, 1, 2, 4, 5).contiguous(), bits, slot, config)
    rtol, atol = {torch.float16: (0, 0), torch.float32: (2.0**-22, 1e-5), torch.bfloat16: (2.0**-7, 0)}[dtype]
    for got in (both[:, :, :, :cached], slot.permute(1, 2, 3, 0, 4)):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    assert (both[:, :, :, cached:] == 7).all()


def test_a_layout_the_kernel_cannot_address_is_refused(kv_kernels):
    """Tensors whose leading dimensions do not merge into one stride are refused, not silently copied (the kernel
    would write the copy)."""
    import torch

    codes = torch.zeros(4, 8, 10, 8, dtype=torch.uint8).transpose(0, 1)
    with pytest.raises(RuntimeError, match="view"):
        kv_kernels.dequantize(codes, torch.zeros(8, 4, 10, 1, 2), 4, torch.empty(8, 4, 10, 16))


def test_auto_is_planned_where_the_job_runs(compose, monkeypatch):
    """kvcache.dequant=auto: PyTorch's kernels on DeepSpeed's CPU accelerator, Triton's planned for a GPU preset (its
    kept layers' dequantization then timed at the bytes it moves); triton asked for without CUDA, outside Triton's
    interpreter, is a problem of this machine naming the key."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kept = ("model=opt-30b", "quant=int4", "memory=tuned", "memory.gpu_budget_gib=48", "kvcache=cpu",
            "kvcache.quant=int4", "kvcache.gpu_layers=24", "batch=64")
    here = plan_job(validate(compose("model=tiny-opt", "kvcache=cpu", "kvcache.quant=int4")), cuda=False)
    assert here.spec.kvcache.dequant == "torch"
    fused = plan_job(validate(compose(*kept, "hardware=h100-80gb")), cuda=True, here=False)
    separate = plan_job(validate(compose(*kept, "hardware=h100-80gb", "kvcache.dequant=torch")), cuda=True,
                        here=False)
    assert fused.spec.kvcache.dequant == "triton"
    assert fused.prediction.decode_step_s < separate.prediction.decode_step_s
    refused = plan_job(validate(compose("model=tiny-opt", "kvcache=cpu", "kvcache.quant=int4",
                                        "kvcache.dequant=triton")), cuda=False)
    assert [(p.key, p.value) for p in refused.problems] == [("kvcache.dequant", "triton")]
    assert "TRITON_INTERPRET=1" in refused.reason
