"""``kvcache=cpu``: the offloaded KV cache of zi_app/run/kvcache.py, host memory made once at its final length,
against the GPU cache (transformers' dynamic cache) on DeepSpeed's CPU accelerator, where the same copies run in
order without streams.

The jobs run the app in their own process under real ZeRO-3, on seeded random tiny checkpoints: OPT (one K/V head
per query head) and Llama (grouped-query attention: 2 K/V heads for 4 query heads). The bytes the cache moves are
counted by the cache itself on a plain model, and compared with the planner's terms for the same spec.
"""

from __future__ import annotations

import pytest

from zi_app import validate
from zi_app.plan.memory import (kept_kv_bytes, kv_cache_bytes, offloaded_kv_bytes, offloaded_kv_host_bytes,
                                stored_kv_bytes, streamed_kv_share)
from zi_app.plan.workload import DTYPE_BYTES, workload

BATCH, PROMPT_LEN, GEN_LEN = 3, 8, 5
WORKLOAD = (f"batch={BATCH}", f"prompt_len={PROMPT_LEN}", f"gen_len={GEN_LEN}", "warmup=1", "repeat=1")


def _common(checkpoint) -> tuple:
    # pin=false: the planner's host term is then the buffer's own bytes (pinned, it rounds to whole pages)
    return ("model=pretrained", f"model.path={checkpoint}", "model.dtype=float32", "offload=cpu", "pin=false",
            *WORKLOAD)


def _plain(checkpoint, compose, *overrides) -> tuple:
    """(spec, the checkpoint's model in plain transformers, ``generate``'s arguments for the workload's greedy
    tokens, those tokens with transformers' own cache) of a ``kvcache=cpu`` job with ``overrides``."""
    import torch
    from transformers import AutoModelForCausalLM

    from zi_app.run.inference import random_prompts

    spec = validate(compose(*_common(checkpoint), "kvcache=cpu", *overrides))
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = random_prompts(BATCH, PROMPT_LEN, spec.model.shape.vocab_size, 0, "cpu")
    arguments = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                     min_new_tokens=GEN_LEN, max_new_tokens=GEN_LEN)
    with torch.no_grad():
        return spec, plain, arguments, plain.generate(**arguments)


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_host_cache_generates_the_gpu_caches_tokens(model, tiny_checkpoint, job, compose, plain_greedy):
    """Identical greedy tokens with the KV cache in host memory (attended on the device or on the host) and on the
    accelerator (and plain transformers'), over a warm-up and a timed generate that reuse the job's one host
    buffer; that buffer is the planner's prediction of the cache's host memory, to the byte."""
    checkpoint = tiny_checkpoint(model)
    on_device = job(*_common(checkpoint), "kvcache=gpu")
    on_host = job(*_common(checkpoint), "kvcache=cpu")
    attending_on_host = job(*_common(checkpoint), "kvcache=cpu", "kvcache.attention=host")
    assert len({t for row in on_device.tokens for t in row}) > 2, f"degenerate output {on_device.tokens}"
    assert on_host.tokens == on_device.tokens == plain_greedy(checkpoint, BATCH, PROMPT_LEN, GEN_LEN)
    assert attending_on_host.tokens == on_device.tokens
    spec = validate(compose(*_common(checkpoint), "kvcache=cpu"))
    assert on_host.metrics["kv_host_bytes"] == offloaded_kv_host_bytes(workload(spec)) > 0
    assert "kv_host_bytes" not in on_device.metrics


def test_layers_kept_on_the_gpu_as_planned_generate_the_gpu_caches_tokens(tiny_checkpoint, job, compose):
    """``kvcache.gpu_layers=auto``: the plan keeps every layer's cache in device memory where the budget holds
    every weight and the cache (here 1 GiB for a tiny model), the job runs with that many and its host buffers
    are then empty; one layer kept by hand leaves the other's in host memory, the planner's bytes. Both generate
    the GPU cache's tokens."""
    checkpoint = tiny_checkpoint("tiny-opt")
    on_device = job(*_common(checkpoint), "kvcache=gpu")
    auto = ("kvcache=cpu", "kvcache.gpu_layers=auto", "memory.persistence=auto", "memory.gpu_budget_gib=1")
    planned = job(*_common(checkpoint), *auto)
    one = job(*_common(checkpoint), "kvcache=cpu", "kvcache.gpu_layers=1")
    assert planned.tokens == one.tokens == on_device.tokens
    assert (planned.metrics["kv_gpu_layers"], planned.metrics["kv_host_bytes"]) == (2, 0)
    assert planned.metrics["kv_gpu_bytes"] == kept_kv_bytes(workload(validate(compose(
        *_common(checkpoint), *auto[:-3], "kvcache.gpu_layers=2")))) > 0
    work = workload(validate(compose(*_common(checkpoint), "kvcache=cpu", "kvcache.gpu_layers=1")))
    assert one.metrics["kv_gpu_layers"] == 1
    assert one.metrics["kv_host_bytes"] == offloaded_kv_host_bytes(work) == one.metrics["kv_gpu_bytes"] > 0


def test_triton_dequantization_generates_pytorchs_tokens(tiny_checkpoint, job, monkeypatch):
    """``kvcache.dequant=triton`` in Triton's interpreter (no GPU here): the app with the int4 cache, one layer kept
    on the device and one streamed through the slots, both dequantized by the fused kernel, generates the tokens
    of PyTorch's kernels (``torch``), and the plan resolves ``auto`` without CUDA to ``torch``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cache = (*_common(tiny_checkpoint("tiny-llama")), "kvcache=cpu", "kvcache.quant=int4", "kvcache.gpu_layers=1")
    fused, separate = job(*cache, "kvcache.dequant=triton"), job(*cache, "kvcache.dequant=torch")
    assert fused.tokens == separate.tokens
    assert fused.metrics["kv_gpu_layers"] == 1 and fused.metrics["kv_host_bytes"] > 0
    assert len({t for row in fused.tokens for t in row}) > 2, f"degenerate output {fused.tokens}"
    auto = job(*cache)
    assert auto.tokens == separate.tokens


def test_a_job_with_a_quantized_host_cache_holds_the_planned_host_bytes(tiny_checkpoint, job, compose):
    """The app with ``kvcache.quant=int4`` (grouped-query attention): it generates (its tokens are not the GPU
    cache's exactly: attention reads dequantized keys and values), and its host buffers are the planner's."""
    checkpoint = tiny_checkpoint("tiny-llama")
    quantized = job(*_common(checkpoint), "kvcache=cpu", "kvcache.quant=int4")
    assert len({t for row in quantized.tokens for t in row}) > 2, f"degenerate output {quantized.tokens}"
    spec = validate(compose(*_common(checkpoint), "kvcache=cpu", "kvcache.quant=int4"))
    assert quantized.metrics["kv_host_bytes"] == offloaded_kv_host_bytes(workload(spec)) > 0


@pytest.mark.quick
@pytest.mark.parametrize("overrides,allowed", [
    (["kvcache=cpu", "kvcache.quant=int3"], "'none', 'int8' or 'int4'"),
    (["kvcache=gpu", "kvcache.quant=int4"], "ours in host memory attended on the GPU"),
    (["kvcache=cpu", "kvcache.attention=host", "kvcache.quant=int8"], "kvcache.attention=device"),
    (["kvcache=cpu", "kvcache.quant=int4", "model.arch.hidden_size=160", "model.arch.num_attention_heads=2"],
     "groups of 64 of a head's 80 elements"),
    (["kvcache=cpu", "kvcache.gpu_layers=3"], "a whole number from 0 to the model's 2 layers"),
    (["kvcache=cpu", "kvcache.gpu_layers=half"], "'auto' or a whole number"),
    (["kvcache=gpu", "kvcache.gpu_layers=auto"], "ours in host memory attended on the GPU"),
    (["kvcache=cpu", "kvcache.attention=host", "kvcache.gpu_layers=1"], "kvcache.attention=device"),
    (["kvcache=cpu", "kvcache.quant=int4", "kvcache.dequant=cuda"], "'auto', 'triton' (one fused kernel) or 'torch'"),
])
def test_a_cache_setting_it_cannot_hold_is_refused(overrides, allowed, compose):
    """kvcache.quant, kvcache.gpu_layers and kvcache.dequant are refused, naming the key, the value and what is
    allowed, before anything loads."""
    from zi_app.config.checks import ConfigError

    with pytest.raises(ConfigError) as refused:
        validate(compose("model=tiny-opt", *overrides))
    key, value = next(o for o in reversed(overrides) if o.startswith("kvcache.")).split("=")
    assert (refused.value.key, str(refused.value.value)) == (key, value)
    assert allowed in str(refused.value)


@pytest.mark.quick
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_values_are_within_half_a_step(bits):
    """kvcache.quant: each value comes back within half its group's step of what went in, for fp16 keys shaped
    as a cache's (tokens, 2, batch, heads, head_dim), more tokens than are quantized at once."""
    import torch

    from zi_app.run.kvcache import dequantize, quantize

    x = torch.randn(70, 2, 3, 4, 128, generator=torch.Generator().manual_seed(0)).mul_(3).to(torch.float16)
    codes = torch.empty(x.shape[:-1] + (128 * bits // 8,), dtype=torch.uint8)
    scales = torch.empty(x.shape[:-1] + (2, 2), dtype=x.dtype)
    quantize(x, bits, codes, scales)
    back = torch.empty_like(x)
    dequantize(codes, scales, bits, out=back)
    step = scales[..., 1:].repeat_interleave(64, dim=-1).squeeze(-2).flatten(-2).float()
    error = (back.float() - x.float()).abs()
    # half a step, and the float16 rounding of the dequantized value
    assert (error <= step / 2 + x.float().abs() * 2**-10).all(), (error - step / 2).max()
    assert 0 < error.mean() < step.mean() / 2


@pytest.mark.quick
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_cache_hands_back_cached_tokens_dequantized_and_new_ones_as_computed(bits):
    """Through the cache itself, a prefix longer than one chunk of the copy up (70 tokens): a decode step's
    attention gets the cached tokens as :func:`quantize` then :func:`dequantize` leave them, chunk after chunk,
    and its own new token exactly as computed."""
    import torch

    from zi_app.run.kvcache import dequantize, host_kv, quantize

    generator = torch.Generator().manual_seed(1)
    prompt = [torch.randn(2, 3, 70, 64, generator=generator) for _ in range(4)]  # keys, values of 2 layers
    new = [torch.randn(2, 3, 1, 64, generator=generator) for _ in range(2)]
    with host_kv(2, 71, pin=False, bits=bits) as memory:
        cache = memory.cache()
        for layer in range(2):
            assert cache.update(prompt[2 * layer], prompt[2 * layer + 1], layer)[0].equal(prompt[2 * layer])
        keys, values = cache.update(*new, 0)
    for cached, given, whole in ((prompt[0], new[0], keys), (prompt[1], new[1], values)):
        token_major = cached.permute(2, 0, 1, 3)
        codes = torch.empty(token_major.shape[:-1] + (64 * bits // 8,), dtype=torch.uint8)
        scales = torch.empty(token_major.shape[:-1] + (1, 2))
        quantize(token_major, bits, codes, scales)
        expected = torch.empty_like(token_major)
        dequantize(codes, scales, bits, out=expected)
        assert whole[:, :, :70].equal(expected.permute(1, 2, 0, 3))
        assert whole[:, :, 70:].equal(given)
        assert not whole[:, :, :70].equal(cached)


@pytest.mark.quick
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_host_cache_moves_the_planned_bytes(model, quant, tiny_checkpoint, compose):
    """kvcache.quant=int8/int4, counted by the cache over one generate: down, each new token's packed keys and
    values and their scales once; up, each decode step every layer's packed prefix (the planner's per-step
    term, a half or a quarter of the unquantized cache's and its scales); the host buffers are the planner's.
    The prefill's token is plain transformers'."""
    import torch

    from zi_app.run.kvcache import host_kv

    spec, plain, arguments, expected = _plain(tiny_checkpoint(model), compose, f"kvcache.quant={quant}")
    shape, work = spec.model.shape, workload(spec)
    with host_kv(shape.layers, PROMPT_LEN + GEN_LEN, pin=False, bits=spec.kvcache.bits) as memory, torch.no_grad():
        tokens = plain.generate(**arguments, past_key_values=memory.cache())
        assert len(set(tokens[:, PROMPT_LEN:].flatten().tolist())) > 2, f"degenerate output {tokens}"
        # the prefill attends over the prompt at full width: its token is the GPU cache's
        assert tokens[:, :PROMPT_LEN + 1].equal(expected[:, :PROMPT_LEN + 1])
        per_token = kv_cache_bytes(shape, BATCH, 1, DTYPE_BYTES[spec.model.dtype])
        last = PROMPT_LEN + GEN_LEN - 1
        assert memory.d2h_bytes == stored_kv_bytes(work, per_token * last)
        assert memory.h2d_bytes == ((GEN_LEN - 1) * offloaded_kv_bytes(work)
                                    + stored_kv_bytes(work, per_token * last // shape.layers))
        unquantized = kv_cache_bytes(shape, BATCH, PROMPT_LEN + GEN_LEN, DTYPE_BYTES[spec.model.dtype])
        assert memory.host_bytes() == offloaded_kv_host_bytes(work) < unquantized * spec.kvcache.bits // 16 * 1.25


@pytest.mark.quick
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_bytes_moved_are_the_planners(model, tiny_checkpoint, compose):
    """Counted by the cache over one generate: down to the host, each new token's keys and values once; up to
    the device, each decode step every layer's cached prefix (the planner's per-step term), plus the first
    layer's prefix fetched ahead after the last step. The layers keep no device memory beyond the two slots.
    Its tokens are plain transformers'."""
    import torch

    from zi_app.run.kvcache import host_kv

    spec, plain, arguments, expected = _plain(tiny_checkpoint(model), compose)
    shape, work = spec.model.shape, workload(spec)
    with host_kv(shape.layers, PROMPT_LEN + GEN_LEN, pin=False) as memory, torch.no_grad():
        cache = memory.cache()
        assert plain.generate(**arguments, past_key_values=cache).equal(expected)
        # What the layers keep are views of the two device slots: no layer holds device memory of its own.
        slots = memory.slots.untyped_storage().data_ptr()
        assert {layer.keys.untyped_storage().data_ptr() for layer in cache.layers} == {slots}
        per_token = kv_cache_bytes(shape, BATCH, 1, DTYPE_BYTES[spec.model.dtype])
        last = PROMPT_LEN + GEN_LEN - 1  # the last token is generated, never fed back
        assert memory.d2h_bytes == per_token * last
        assert memory.h2d_bytes == (GEN_LEN - 1) * offloaded_kv_bytes(work) + per_token * last // shape.layers
        assert memory.host_bytes() == kv_cache_bytes(shape, BATCH, PROMPT_LEN + GEN_LEN, DTYPE_BYTES[spec.model.dtype])


@pytest.mark.quick
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_layers_kept_on_the_gpu_cross_no_link(model, quant, tiny_checkpoint, compose):
    """kvcache.gpu_layers=1 of 2, counted by the cache over one generate against the same cache with none kept:
    the same tokens; over the link only the other layer's bytes (the planner's terms for the spec), the kept
    layer's within the device, in a device buffer of the planner's size; the host buffers hold one layer."""
    import torch

    from zi_app.run.kvcache import host_kv

    spec, plain, arguments, _ = _plain(tiny_checkpoint(model), compose, f"kvcache.quant={quant}",
                                       "kvcache.gpu_layers=1")
    shape, work, bits = spec.model.shape, workload(spec), spec.kvcache.bits
    every = workload(validate(compose(*_common(tiny_checkpoint(model)), "kvcache=cpu", f"kvcache.quant={quant}")))
    with host_kv(shape.layers, PROMPT_LEN + GEN_LEN, pin=False, bits=bits) as offloaded, torch.no_grad():
        expected = plain.generate(**arguments, past_key_values=offloaded.cache())
        moved = offloaded.h2d_bytes + offloaded.d2h_bytes
    with host_kv(shape.layers, PROMPT_LEN + GEN_LEN, pin=False, bits=bits, gpu_layers=1) as memory, torch.no_grad():
        assert plain.generate(**arguments, past_key_values=memory.cache()).equal(expected)
        assert memory.where == [(0, 0), (1, 0)]  # the second layer kept, the first streamed
        per_token = kv_cache_bytes(shape, BATCH, 1, DTYPE_BYTES[spec.model.dtype])
        last = PROMPT_LEN + GEN_LEN - 1
        assert memory.d2h_bytes == streamed_kv_share(work, stored_kv_bytes(work, per_token * last))
        # each decode step the streamed layer's prefix, and after the last one the first layer's fetched ahead
        assert memory.h2d_bytes == ((GEN_LEN - 1) * offloaded_kv_bytes(work)
                                    + stored_kv_bytes(work, per_token * last // shape.layers))
        assert 0 < offloaded_kv_bytes(work) == offloaded_kv_bytes(every) // 2
        assert memory.h2d_bytes + memory.d2h_bytes + memory.kept_bytes == moved
        assert memory.kept_store_bytes() == kept_kv_bytes(work) == memory.host_bytes() > 0
        assert memory.host_bytes() == offloaded_kv_host_bytes(work) == offloaded_kv_host_bytes(every) // 2


@pytest.mark.quick
def test_layers_kept_on_the_gpu_are_spread_through_the_model():
    """kvcache.gpu_layers spread evenly: the link never idles through more than a run of them."""
    from zi_app.run.kvcache import on_gpu

    assert on_gpu(8, 0) == (False,) * 8 and on_gpu(8, 8) == (True,) * 8
    assert on_gpu(8, 2) == (False, False, False, True) * 2
    assert on_gpu(48, 36).count(True) == 36 and "TTTT" not in "".join("T" if k else "F" for k in on_gpu(48, 36))


@pytest.mark.quick
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_attending_on_the_host_moves_only_the_new_tokens(model, tiny_checkpoint, compose):
    """kvcache.attention=host, counted by the cache over one generate: down to the host, the prompt's keys and
    values in one copy padded to the final length, then each new token's once; up, no cached prefix; the host's
    attention reads each decode step every layer's cached tokens (the planner's term for it), and the device
    holds no slots. Its tokens are plain transformers'."""
    import torch

    from zi_app.plan.memory import cached_kv_bytes
    from zi_app.run.kvcache import attend_on_host, host_kv

    spec, plain, arguments, expected = _plain(tiny_checkpoint(model), compose, "kvcache.attention=host")
    shape, work = spec.model.shape, workload(spec)
    attend_on_host(plain)
    with host_kv(shape.layers, PROMPT_LEN + GEN_LEN, pin=False, attend_on_host=True) as memory, torch.no_grad():
        cache = memory.cache()
        assert plain.generate(**arguments, past_key_values=cache).equal(expected)
        assert memory.slots is None and memory.h2d_bytes == 0
        host = memory.host.untyped_storage().data_ptr()
        assert {layer.keys.untyped_storage().data_ptr() for layer in cache.layers} == {host}
        per_token = kv_cache_bytes(shape, BATCH, 1, DTYPE_BYTES[spec.model.dtype])
        assert memory.d2h_bytes == per_token * (PROMPT_LEN + GEN_LEN) + per_token * (GEN_LEN - 1)
        assert memory.host_read_bytes == (GEN_LEN - 1) * cached_kv_bytes(work) + per_token * (GEN_LEN - 1)
