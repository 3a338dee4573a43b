"""Does a quantized KV cache kept on the GPU (``kvcache.gpu_layers``) pay against streaming it (issue 21 item 1)?

For one decoder layer of a model, one decode step at ``batch`` x ``context`` cached tokens: (a) the GPU time of
what a kept layer does each step, :func:`zi_app.run.kvcache.dequantize_with_new` (its packed keys and values
dequantized into attention's layout, then the new token), with each ``--kernel`` (kvcache.dequant: PyTorch's
kernels 64 tokens at a time, Triton's fused one at once); (b) what transformers' GPU cache does
for the same layer at full width (``torch.cat`` of the cache and the new token); and on CUDA (c) the pinned link's
time for the layer's packed bytes, which the host cache streams instead. Keeping a layer pays where (a) is below
(c); the planner's ``KEPT_KV_DEQUANT_S_PER_ELEMENT`` (zi_app/plan/speed.py) is PyTorch's (a) per cached element,
and ``FUSED_KV_DEQUANT_BANDWIDTH_SHARE`` Triton's bytes read and written over (a), as a share of ``--gpu-gbps``.

    python benchmarks/kv_dequant.py --model opt-30b --bits 4 --batch 64 96 --kernel torch triton
    python benchmarks/kv_dequant.py --hidden 256 --heads 4 --batch 2 --context 128   # a CPU-only smoke run
    TRITON_INTERPRET=1 python benchmarks/kv_dequant.py --hidden 256 --heads 4 --batch 2 --context 128 --kernel triton

Prints a table, each time the median of ``--repeat`` timings after one untimed call; dtype float16 on CUDA,
bfloat16 on the CPU.
"""

from __future__ import annotations

import argparse

import torch

from cpu_attention import add_layer_arguments, layer_shape  # benchmarks/, the script's own directory
from zi_app.config.checks import KV_QUANT_CHUNK_TOKENS, kv_quant_group
from zi_app.plan.hardware import h2d_gbps, median_seconds
from zi_app.run.kvcache import dequantize_with_new, quantize


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="kvcache.quant: int4 or int8")
    parser.add_argument("--batch", type=int, nargs="+", required=True)
    parser.add_argument("--context", type=int, default=543, help="cached tokens (prompt 512 + 31: the last step)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kernel", nargs="+", choices=("torch", "triton"), default=["torch"],
                        help="kvcache.dequant: the kernels that dequantize (triton: on CUDA, or TRITON_INTERPRET=1)")
    parser.add_argument("--configs", action="store_true",
                        help="also time Triton's kernel at each of kv_kernels.CONFIGS (the autotuner's choices)")
    parser.add_argument("--gpu-gbps", type=float, default=3350.0,
                        help="the GPU's memory bandwidth, GB/s, for the share Triton's kernel reaches (H100 SXM: 3350)")
    args = parser.parse_args(argv)
    hidden, heads = layer_shape(parser, args)
    head_dim = hidden // heads
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.bfloat16)
    print(f"hidden {hidden}, heads {heads}, int{args.bits}, context {args.context}, {dtype}, "
          f"{torch.cuda.get_device_name(0) if cuda else 'no GPU'}; one layer's keys and values, one decode step")
    print("| batch | kernel | cached elements (M) | packed MB | kept: dequantize ms | ps / element | share of "
          f"{args.gpu_gbps:.0f} GB/s | max difference from torch | GPU cache: cat ms | link ms | kept / link |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in args.batch:
        cached = torch.randn(2, batch, heads, args.context, head_dim, generator=generator, device=device, dtype=dtype)
        codes = torch.empty(cached.shape[:-1] + (head_dim * args.bits // 8,), dtype=torch.uint8, device=device)
        scales = torch.empty(cached.shape[:-1] + (head_dim // kv_quant_group(head_dim), 2), dtype=dtype, device=device)
        for start in range(0, args.context, KV_QUANT_CHUNK_TOKENS):  # as the cache stores them, a chunk at a time
            part = slice(start, start + KV_QUANT_CHUNK_TOKENS)
            quantize(cached[:, :, :, part], args.bits, codes[:, :, :, part], scales[:, :, :, part])
        new = torch.randn(2, batch, heads, 1, head_dim, generator=generator, device=device, dtype=dtype)
        cat_s = median_seconds(lambda: torch.cat((cached, new), dim=-2), args.repeat, cuda)
        packed = codes.numel() + scales.numel() * scales.element_size()
        link_s = packed / h2d_gbps(pinned=True, nbytes=packed, repeats=args.repeat) / 1e9 if cuda else None
        reference = dequantize_with_new(codes, scales, args.bits, new, "torch")
        moved = packed + cached.numel() * cached.element_size()  # read once, written once at full width
        for kernel in args.kernel:
            difference = (dequantize_with_new(codes, scales, args.bits, new, kernel).float() - reference.float()).abs()
            kept_s = median_seconds(lambda: dequantize_with_new(codes, scales, args.bits, new, kernel), args.repeat,
                                    cuda)
            link = f"{link_s * 1e3:.3f} | {kept_s / link_s:.2f}" if link_s else " | "
            print(f"| {batch} | {kernel} | {cached.numel() / 1e6:.1f} | {packed / 1e6:.1f} | {kept_s * 1e3:.3f} | "
                  f"{kept_s / cached.numel() * 1e12:.1f} | {moved / kept_s / 1e9 / args.gpu_gbps:.2f} | "
                  f"{difference.max().item():.3g} | "
                  f"{cat_s * 1e3:.3f} | {link} |")
        if args.configs:  # the dequantization alone (no new token), into a buffer of the cache's shape
            from zi_app.run import kv_kernels

            out = torch.empty_like(cached)
            for rows, warps in kv_kernels.CONFIGS:
                config_s = median_seconds(lambda: kv_kernels.dequantize(codes, scales, args.bits, out, (rows, warps)),
                                          args.repeat, cuda)
                print(f"| {batch} | triton, {rows} rows x {warps} warps | | | {config_s * 1e3:.3f} | "
                      f"{config_s / cached.numel() * 1e12:.1f} | {moved / config_s / 1e9 / args.gpu_gbps:.2f} | "
                      f"{(out.float() - reference[..., :-1, :].float()).abs().max().item():.3g} | | | |")

if __name__ == "__main__":
    main()
