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
from zi_app.plan.memory import kv_cache_bytes, offloaded_kv_bytes, offloaded_kv_host_bytes
from zi_app.plan.workload import DTYPE_BYTES, workload

BATCH, PROMPT_LEN, GEN_LEN = 3, 8, 5
WORKLOAD = (f"batch={BATCH}", f"prompt_len={PROMPT_LEN}", f"gen_len={GEN_LEN}", "warmup=1", "repeat=1")


def _common(checkpoint) -> tuple:
    # pin=false: the planner's host term is then the buffer's own bytes (pinned, it rounds to whole pages)
    return ("model=pretrained", f"model.path={checkpoint}", "model.dtype=float32", "offload=cpu", "pin=false",
            *WORKLOAD)


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_host_cache_generates_the_gpu_caches_tokens(model, tiny_checkpoint, job, compose, plain_greedy):
    """Identical greedy tokens with the KV cache in host memory (attended on the device or on the host) and on the
    accelerator (and plain transformers'),
    over a warm-up and a timed generate that reuse the job's one host buffer; that buffer is the planner's
    prediction of the cache's host memory, to the byte."""
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


@pytest.mark.quick
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_bytes_moved_are_the_planners(model, tiny_checkpoint, compose):
    """Counted by the cache over one generate: down to the host, each new token's keys and values once; up to
    the device, each decode step every layer's cached prefix (the planner's per-step term), plus the first
    layer's prefix fetched ahead after the last step. The layers keep no device memory beyond the two slots."""
    import torch
    from transformers import AutoModelForCausalLM

    from zi_app.run.inference import random_prompts
    from zi_app.run.kvcache import host_kv

    checkpoint = tiny_checkpoint(model)
    spec = validate(compose(*_common(checkpoint), "kvcache=cpu"))
    shape, work = spec.model.shape, workload(spec)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = random_prompts(BATCH, PROMPT_LEN, shape.vocab_size, 0, "cpu")
    with host_kv(shape.layers, PROMPT_LEN + GEN_LEN, pin=False) as memory, torch.no_grad():
        cache = memory.cache()
        plain.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                       min_new_tokens=GEN_LEN, max_new_tokens=GEN_LEN, past_key_values=cache)
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
def test_attending_on_the_host_moves_only_the_new_tokens(model, tiny_checkpoint, compose):
    """kvcache.attention=host, counted by the cache over one generate: down to the host, the prompt's keys and
    values in one copy padded to the final length, then each new token's once; up, no cached prefix; the host's attention reads each decode step every layer's cached
    tokens (the planner's term for it), and the device holds no slots. Its tokens are plain transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    from zi_app.plan.memory import cached_kv_bytes
    from zi_app.run.inference import random_prompts
    from zi_app.run.kvcache import attend_on_host, host_kv

    checkpoint = tiny_checkpoint(model)
    spec = validate(compose(*_common(checkpoint), "kvcache=cpu", "kvcache.attention=host"))
    shape, work = spec.model.shape, workload(spec)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = random_prompts(BATCH, PROMPT_LEN, shape.vocab_size, 0, "cpu")
    arguments = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                     min_new_tokens=GEN_LEN, max_new_tokens=GEN_LEN)
    with torch.no_grad():
        expected = plain.generate(**arguments)
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
