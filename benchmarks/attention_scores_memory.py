"""Bytes a written-out attention holds per score in the prefill (zi_app/plan/memory.py ``scores_bytes``): a narrow
BLOOM (width 64, 32 heads: the scores dwarf everything else) runs one forward pass of a long prompt on this
machine's CPU, and the process's peak RSS over its RSS just before, divided by the scores of one layer
(``batch x heads x prompt^2``), is printed per dtype and layer count beside what the planner counts on a CPU.

    python benchmarks/attention_scores_memory.py [--batch 16] [--prompt 512]
"""

from __future__ import annotations

import argparse

import torch
from transformers import BloomConfig, BloomForCausalLM

from zi_app.config.schema import ModelShape
from zi_app.plan.memory import scores_bytes
from zi_app.plan.workload import Workload

HEADS, WIDTH, VOCAB = 32, 64, 1024


def status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def measured_per_score(dtype: torch.dtype, layers: int, batch: int, prompt: int) -> float:
    """Peak RSS added by one forward pass, per score of one layer."""
    model = BloomForCausalLM(BloomConfig(hidden_size=WIDTH, n_layer=layers, n_head=HEADS, vocab_size=VOCAB))
    model = model.to(dtype).eval()
    ids = torch.randint(0, VOCAB, (batch, prompt))
    with torch.no_grad():
        model(ids[:1, :8])  # the first call's one-time allocations out of the measurement
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        before = status_bytes("VmRSS")
        model(ids, use_cache=False)
        peak = status_bytes("VmHWM")
    return (peak - before) / (batch * HEADS * prompt ** 2)


def planned_per_score(dtype: str, layers: int, batch: int, prompt: int) -> float:
    """``scores_bytes`` on a CPU (its per-head query/key/value copies included, as the measurement includes
    them), per score."""
    shape = ModelShape(hidden_size=WIDTH, layers=layers, heads=HEADS, kv_heads=HEADS, ffn_dim=4 * WIDTH,
                       vocab_size=VOCAB, embed_dim=WIDTH, max_positions=None, tied_embeddings=True,
                       eager_attention=True)
    work = Workload(shape=shape, dtype=dtype, weight_bytes=2, batch=batch, prompt_len=prompt, gen_len=1,
                    live_elements=0, on_cpu=True)
    return scores_bytes(work) / (batch * HEADS * prompt ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512)
    args = parser.parse_args()
    print(f"narrow BLOOM (width {WIDTH}, {HEADS} heads), batch {args.batch}, prompt {args.prompt}, "
          f"torch {torch.__version__}, on this CPU\n")
    print("| dtype | layers | measured bytes/score | planned bytes/score |\n|---|---|---|---|")
    for dtype in ("bfloat16", "float16", "float32"):
        for layers in (1, 2):
            measured = measured_per_score(getattr(torch, dtype), layers, args.batch, args.prompt)
            planned = planned_per_score(dtype, layers, args.batch, args.prompt)
            print(f"| {dtype} | {layers} | {measured:.1f} | {planned:.1f} |", flush=True)


if __name__ == "__main__":
    main()
