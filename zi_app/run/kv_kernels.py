"""The quantized KV cache's dequantization as one Triton kernel (``kvcache.dequant=triton``).

PyTorch dequantizes a packed cache in separate kernels (unpack the nibbles, convert, scale and shift), each of which
reads and writes the whole chunk: about 1.0e-11 s per cached element on an H100, what the link takes to bring the
same int4 element up (docs/benchmarks.md, sixth run), so that a layer kept on the GPU saved nothing. This kernel
reads each packed byte and its group's minimum and step once and writes the values once, in the layout the caller
gives (the kept layers' attention layout, a slot's token-major one).

Imported only where the kernel runs: Triton comes with PyTorch's CUDA wheels for Linux; without a GPU it runs in
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported), which is how the CPU tests run it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 32  # tokens per program: with a head of 128 elements, 4096 values a program


@triton.jit
def _dequantize_kernel(codes, scales, out, tokens,
                       codes_outer, codes_token, scales_outer, scales_token, out_outer, out_token,
                       HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                       BLOCK_TOKENS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    outer = tl.program_id(0).to(tl.int64)  # int64 offsets: a kept cache's buffer passes 2**31 elements
    token = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)[:, None]
    element = tl.arange(0, BLOCK_DIM)[None, :]
    mask = (token < tokens) & (element < HEAD_DIM)
    if BITS == 4:  # two codes a byte, the even element's in the high nibble (zi_app.run.kvcache.quantize)
        byte = tl.load(codes + outer * codes_outer + token * codes_token + element // 2, mask=mask, other=0)
        code = tl.where(element % 2 == 0, byte >> 4, byte & 15)
    else:
        code = tl.load(codes + outer * codes_outer + token * codes_token + element, mask=mask, other=0)
    group = scales + outer * scales_outer + token * scales_token + (element // GROUP) * 2
    low = tl.load(group, mask=mask, other=0.0).to(tl.float32)
    step = tl.load(group + 1, mask=mask, other=0.0).to(tl.float32)
    value = low + code.to(tl.float32) * step
    tl.store(out + outer * out_outer + token * out_token + element, value.to(out.dtype.element_ty), mask=mask)


def _rows(tensor: torch.Tensor, tokens: int, width: int) -> torch.Tensor:
    """``tensor`` as (outer, tokens, width) without a copy: ``out`` must be written where it is."""
    rows = tensor.view(-1, tokens, width)
    if rows.stride(2) != 1:
        raise ValueError(f"a head's elements must be contiguous, got strides {tensor.stride()}")
    return rows


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write into ``out`` (..., tokens, head_dim) the values of ``codes`` (..., tokens, head_dim * bits / 8) and
    ``scales`` (..., tokens, groups, 2), as :func:`zi_app.run.kvcache.dequantize` does, in one kernel. The
    leading dimensions of each tensor must merge into one stride (a view of a kept layer or of a slot does)."""
    if not out.numel():
        return
    tokens, head_dim = out.shape[-2:]
    groups = scales.shape[-2]
    codes_rows, out_rows = _rows(codes, tokens, codes.shape[-1]), _rows(out, tokens, head_dim)
    scales_rows = _rows(scales, tokens, groups * 2)
    grid = (out_rows.shape[0], triton.cdiv(tokens, BLOCK_TOKENS))
    _dequantize_kernel[grid](codes_rows, scales_rows, out_rows, tokens,
                             codes_rows.stride(0), codes_rows.stride(1), scales_rows.stride(0), scales_rows.stride(1),
                             out_rows.stride(0), out_rows.stride(1),
                             HEAD_DIM=head_dim, GROUP=head_dim // groups, BITS=bits, BLOCK_TOKENS=BLOCK_TOKENS,
                             BLOCK_DIM=triton.next_power_of_2(head_dim))
