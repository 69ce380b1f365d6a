"""Triton rotary embedding: ``rotary(x[T, H, D], cos[T, R/2], sin[T, R/2], rotary_dim=R, interleaved)``.

One program per token and block of heads. Pairs are ``(i, i + R/2)`` (NeoX) or ``(2i, 2i + 1)``
(GPT-J, ``interleaved``); ``o1 = x1 cos - x2 sin``, ``o2 = x2 cos + x1 sin`` in fp32, rounded once to x's
dtype, as `mistralrs.nn.torch_ops.rotary`; dims past R are copied. x may be a strided view (a slice of a
fused qkv projection) as long as its last dim is contiguous. Anything else goes to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels.triton_support import runs_here


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, x_st, x_sh, cs_st, head_dim, half,
                   INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_REST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    hmask = heads < n_heads
    imask = i < half
    m = hmask[:, None] & imask[None, :]
    c = tl.load(cos_ptr + t * cs_st + i, mask=imask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * cs_st + i, mask=imask, other=0.0).to(tl.float32)[None, :]
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    x_row = x_ptr + t * x_st + heads[:, None].to(tl.int64) * x_sh
    y_row = y_ptr + (t * n_heads + heads[:, None].to(tl.int64)) * head_dim
    x1 = tl.load(x_row + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    tl.store(y_row + i1[None, :], o1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_row + i2[None, :], o2.to(y_ptr.dtype.element_ty), mask=m)
    if BLOCK_REST > 0:  # partial rotary: the dims past rotary_dim pass through
        j = 2 * half + tl.arange(0, BLOCK_REST)
        mr = hmask[:, None] & (j < head_dim)[None, :]
        tl.store(y_row + j[None, :], tl.load(x_row + j[None, :], mask=mr, other=0.0), mask=mr)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
           interleaved: bool = False) -> torch.Tensor:
    d = rotary_dim or x.shape[-1]
    if (not runs_here(x, cos, sin) or x.dim() != 3 or d % 2 or d > x.shape[-1] or x.stride(-1) != 1
            or cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != x.shape[0] or cos.shape[1] != d // 2
            or not x.dtype.is_floating_point):
        return torch_ops.rotary(x, cos, sin, rotary_dim, interleaved)
    T, H, D = x.shape
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return y
    cos, sin = cos.contiguous(), sin.contiguous()
    half = d // 2
    block_h = min(triton.next_power_of_2(H), 16)
    rest = D - d
    _rotary_kernel[(T, triton.cdiv(H, block_h))](
        x, cos, sin, y, H, x.stride(0), x.stride(1), cos.stride(0), D, half,
        INTERLEAVED=bool(interleaved), BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
    )
    return y
