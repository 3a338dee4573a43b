"""Should decode attention over an offloaded KV cache run on the CPU (FlexGen's delegation, issue 21 item 1)?

For one decoder layer of a model, one decode step at ``batch`` x ``context`` cached tokens: the seconds to
(a) compute attention on the CPU over the host-resident cache (its keys and values read from host memory by the
CPU; the query and the output, a few KB, are what would cross PCIe), and (b) copy that layer's keys and values
to the GPU over the pinned link (what ``kvcache=cpu`` does today), then attend there. CPU attention pays where
(a) is below (b): its reads then also leave the link to the weights, instead of sharing it.

    python benchmarks/cpu_attention.py --model opt-30b --batch 16 64 128 --context 544
    python benchmarks/cpu_attention.py --hidden 256 --heads 4 --batch 2 --context 64   # a CPU-only smoke run

Prints a table: per layer, the cache's bytes, CPU attention seconds and GB/s, and on CUDA the link's copy
seconds and GB/s for the same bytes, each the median of ``--repeat`` timings (the planner's own probes).
dtype: the cache's (fp16 on CUDA machines, bfloat16 on the CPU by default).
"""

from __future__ import annotations

import argparse

import torch

from zi_app.plan.hardware import h2d_gbps, host_attention_gbps

SHAPES = {"opt-30b": (7168, 56), "opt-66b": (9216, 72), "opt-175b": (12288, 96)}  # hidden size, attention heads


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, or ``--hidden`` and ``--heads``: the attention layer a KV-cache benchmark sizes its cache by."""
    parser.add_argument("--model", choices=sorted(SHAPES), help="hidden size and heads of this model")
    parser.add_argument("--hidden", type=int, help="hidden size (instead of --model)")
    parser.add_argument("--heads", type=int, help="attention heads (instead of --model)")


def layer_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """(hidden size, attention heads) of :func:`add_layer_arguments`' arguments; a usage error where unusable."""
    hidden, heads = SHAPES[args.model] if args.model else (args.hidden, args.heads)
    if not hidden or not heads or hidden % heads:
        parser.error("give --model, or --hidden and --heads with heads dividing hidden")
    return hidden, heads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", required=True)
    parser.add_argument("--context", type=int, default=544, help="cached tokens (prompt 512 + 32: the last step)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    hidden, heads = layer_shape(parser, args)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.bfloat16
    print(f"hidden {hidden}, heads {heads}, context {args.context}, {dtype}, {args.threads} CPU threads, "
          f"{torch.cuda.get_device_name(0) if cuda else 'no GPU'}; per layer, one decode step")
    print("| batch | KV bytes (MB) | CPU attention s | CPU GB/s | link copy s | link GB/s | CPU / link |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        nbytes = 2 * batch * args.context * hidden * torch.finfo(dtype).bits // 8
        gbps = host_attention_gbps(str(dtype).removeprefix("torch."), batch, heads, args.context, hidden // heads,
                                   args.repeat)
        cpu_s = nbytes / gbps / 1e9
        copy_s = nbytes / h2d_gbps(pinned=True, nbytes=nbytes, repeats=args.repeat) / 1e9 if cuda else None
        link = f"{copy_s:.4f} | {nbytes / copy_s / 1e9:.1f} | {cpu_s / copy_s:.2f}" if copy_s else "| |"
        print(f"| {batch} | {nbytes / 1e6:.1f} | {cpu_s:.4f} | {nbytes / cpu_s / 1e9:.1f} | {link} |")


if __name__ == "__main__":
    main()
