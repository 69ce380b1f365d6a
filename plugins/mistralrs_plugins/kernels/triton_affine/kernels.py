"""Triton ``qmatmul_affine(x[..., K], packed uint8[N, row_bytes], bias, *, bits, pairs, out_f32=False)``
over the affine group layout (`mistralrs_plugins.quant.affine.layout`: per super-block of 128 weights the
codes in q4_0's nibble order, then `pairs` fp32 scales and `pairs` fp32 offsets).

Grid: tiles of ``BLOCK_M`` rows of x by ``BLOCK_N`` output features. Along K, each step gathers the codes of
``BLOCK_K`` weights per feature from their bytes (4-bit: byte ``16j + i`` holds elements ``32j + i`` low and
``32j + 16 + i`` high; 8-bit: ``16j + i`` and ``64 + 16j + i``), the (s, b) pair of each weight's group
(read as fp32 through a float view of the same bytes), forms ``s * q + b`` in fp32 as the reference's
`layout.dequantize` does, and accumulates ``x @ w.T`` with full-precision dots. The bias is added in fp32 and
the result rounded once. Each output is one fixed sequence of tile dots over K whatever the number of rows,
so a row's result does not depend on the batch it is in. Anything the kernel does not take goes to the
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_plugins.kernels.triton_support import runs_here
from mistralrs_plugins.quant.affine import layout

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _affine_kernel(x_ptr, w_ptr, wf_ptr, b_ptr, y_ptr, M, N, K, x_sm, row_bytes,
                   BITS: tl.constexpr, PAIRS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    SB_BYTES: tl.constexpr = 16 * BITS + 8 * PAIRS
    SPAN: tl.constexpr = 128 // PAIRS  # weights per (s, b) pair
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    row0 = rn[:, None].to(tl.int64) * row_bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_sm + kk[None, :], mask=mm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        wm = nm[:, None] & km[None, :]
        e = kk % 128
        j = e // 32
        hi = (e % 32) // 16
        i = e % 16
        sb = row0 + (kk // 128 * SB_BYTES)[None, :]
        if BITS == 4:
            byte = tl.load(w_ptr + sb + (16 * j + i)[None, :], mask=wm, other=0).to(tl.int32)
            q = (byte >> (4 * hi)[None, :]) & 0xF
        else:
            q = tl.load(w_ptr + sb + (64 * hi + 16 * j + i)[None, :], mask=wm, other=0).to(tl.int32)
        pair = sb + (16 * BITS + 4 * (e // SPAN))[None, :]  # byte offset of s; b is 4 * PAIRS further
        s = tl.load(wf_ptr + pair // 4, mask=wm, other=0.0)
        b = tl.load(wf_ptr + pair // 4 + PAIRS, mask=wm, other=0.0)
        w = q.to(tl.float32) * s + b
        w = tl.where(wm, w, 0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def qmatmul_affine(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int,
                   pairs: int, out_f32: bool = False) -> torch.Tensor:
    """The reference's signature (`layout.qmatmul_affine`)."""
    K = x.shape[-1] if x.dim() else 0
    if (not runs_here(x, packed, bias) or x.dim() == 0 or x.dtype not in DTYPES or bits not in layout.BITS
            or pairs not in (1, 2, 4) or packed.dtype != torch.uint8 or packed.dim() != 2
            or not packed.is_contiguous() or packed.shape[1] != layout.row_bytes(K, bits, pairs)
            or packed.storage_offset() % 4 or (bias is not None and bias.shape != (packed.shape[0],))):
        return layout.qmatmul_affine(x, packed, bias, bits=bits, pairs=pairs, out_f32=out_f32)
    N = packed.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
    if M and N and K:
        _affine_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
            x2, packed, packed.view(torch.float32), bias if bias is not None else y, y, M, N, K, x2.stride(0),
            packed.shape[1], BITS=bits, PAIRS=pairs, HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
    elif M and N:
        y.copy_(bias.to(y.dtype).expand(M, N) if bias is not None else torch.zeros_like(y))
    return y.reshape(*x.shape[:-1], N)
