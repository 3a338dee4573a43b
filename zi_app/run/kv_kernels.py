"""The quantized KV cache's dequantization as one Triton kernel (``kvcache.dequant=triton``).

PyTorch dequantizes a packed cache in separate kernels (unpack the nibbles, convert, scale and shift), each of which
reads and writes the whole chunk: about 1.0e-11 s per cached element on an H100, what the link takes to bring the
same int4 element up (docs/benchmarks.md, sixth run), so that a layer kept on the GPU saved nothing. This kernel
takes 1.5e-12 s, half the GPU's memory bandwidth, with the same values to the bit (benchmarks/kv_dequant.py,
docs/benchmarks.md's seventh run). It reads each packed byte and its group's minimum and step once and writes the
values once, in the layout the caller gives (the kept layers' attention layout, a slot's token-major one), a block
of rows (one token's head each) a program, the block's size chosen by Triton's autotuner on the GPU.

Imported only where the kernel runs: Triton comes with PyTorch's CUDA wheels for Linux; without a GPU it runs in
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported), which is how the CPU tests run it.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# (rows a program dequantizes, warps) tried by Triton's autotuner on the GPU the first time a head size and width
# are dequantized; a row is one token's head (with a head of 128 elements, 16 rows are 2048 values)
CONFIGS = ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8), (256, 8))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter has no autotuner (no GPU to time)


@triton.jit
def _dequantize_kernel(codes, scales, out, rows, tokens,
                       codes_outer, codes_token, scales_outer, scales_token, out_outer, out_token,
                       HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    # Rows are (outer, token) pairs numbered outer-major; int64: a kept cache's buffer passes 2**31 elements.
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    outer, token = row // tokens, row % tokens
    live = row < rows
    element = tl.arange(0, BLOCK_DIM)[None, :]
    mask = live & (element < HEAD_DIM)
    packed = codes + outer * codes_outer + token * codes_token
    if BITS == 4:  # two codes a byte, the even element's in the high nibble (zi_app.run.kvcache.quantize)
        pair = tl.arange(0, BLOCK_DIM // 2)[None, :]
        byte = tl.load(packed + pair, mask=live & (pair < HEAD_DIM // 2), other=0)
        # tl.interleave's own definition, written out: a function of Triton's standard library made before the
        # interpreter was asked for (torch imports Triton) cannot run in it
        code = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_ROWS, BLOCK_DIM))
    else:
        code = tl.load(packed + element, mask=mask, other=0)
    group = scales + outer * scales_outer + token * scales_token + (element // GROUP) * 2
    low = tl.load(group, mask=mask, other=0.0).to(tl.float32)
    step = tl.load(group + 1, mask=mask, other=0.0).to(tl.float32)
    value = low + code.to(tl.float32) * step
    tl.store(out + outer * out_outer + token * out_token + element, value.to(out.dtype.element_ty), mask=mask)


_tuned = None if INTERPRETED else triton.autotune(
    [triton.Config({"BLOCK_ROWS": rows}, num_warps=warps) for rows, warps in CONFIGS],
    key=["HEAD_DIM", "BITS"])(_dequantize_kernel)


def _rows(tensor: torch.Tensor, tokens: int, width: int) -> torch.Tensor:
    """``tensor`` as (outer, tokens, width) without a copy: ``out`` must be written where it is."""
    rows = tensor.view(-1, tokens, width)
    if rows.stride(2) != 1:
        raise ValueError(f"a head's elements must be contiguous, got strides {tensor.stride()}")
    return rows


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor,
               config: Optional[Tuple[int, int]] = None) -> None:
    """Write into ``out`` (..., tokens, head_dim) the values of ``codes`` (..., tokens, head_dim * bits / 8) and
    ``scales`` (..., tokens, groups, 2), as :func:`zi_app.run.kvcache.dequantize` does, in one kernel. The
    leading dimensions of each tensor must merge into one stride (a view of a kept layer or of a slot does).
    ``config``: one of :data:`CONFIGS`; by default the autotuner's on a GPU, the second in the interpreter."""
    if not out.numel():
        return
    tokens, head_dim = out.shape[-2:]
    groups = scales.shape[-2]
    codes_rows, out_rows = _rows(codes, tokens, codes.shape[-1]), _rows(out, tokens, head_dim)
    scales_rows = _rows(scales, tokens, groups * 2)
    rows = out_rows.shape[0] * tokens
    arguments = (codes_rows, scales_rows, out_rows, rows, tokens, codes_rows.stride(0), codes_rows.stride(1),
                 scales_rows.stride(0), scales_rows.stride(1), out_rows.stride(0), out_rows.stride(1))
    shape = dict(HEAD_DIM=head_dim, GROUP=head_dim // groups, BITS=bits, BLOCK_DIM=triton.next_power_of_2(head_dim))
    if config is None and _tuned is not None:
        _tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)](*arguments, **shape)
        return
    block_rows, warps = config or CONFIGS[1]
    _dequantize_kernel[(triton.cdiv(rows, block_rows),)](*arguments, **shape, BLOCK_ROWS=block_rows, num_warps=warps)
