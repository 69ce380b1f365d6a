"""Triton block-scaled widening linears: ``linear_fp8(x, weight, scale, bias, *, block, out_f32)``,
``linear_int8`` (same signature) and ``linear_lut4(x, packed, table, scale, bias, *, block, out_f32)``,
``W[n, k] = widen(weight)[n, k] * scale[n // bn, k // bk]`` (`block` (bn, bk); None: one scale).

Grid: tiles of ``BLOCK_M`` rows of x by ``BLOCK_N`` output features; along K, ``BLOCK_K`` weights per feature
are loaded and widened to fp32 in registers: E4M3 bytes decoded with integer operations (`triton_fp8`: exact,
and independent of the GPU's fp8 support), int8 converted, 4-bit codes (two per byte, the first in the high nibble) looked up in the table;
each multiplied by its block's scale (gathered per element, so blocks of any size and partial edge blocks
are the reference's `block_scale_rows`) and accumulated with full-precision dots. The bias is added in fp32
and the result rounded once. A row's result does not depend on the batch it is in (one fixed sequence of tile
dots per output). What the kernels do not take goes to the op's registered reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs.nn.kernels import lookup_reference
from mistralrs_plugins.kernels.triton_fp8 import e4m3_to_f32
from mistralrs_plugins.kernels.triton_support import runs_here

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = {"linear_fp8": 0, "linear_int8": 1, "linear_lut4": 2}


@triton.jit
def _widen_kernel(x_ptr, w_ptr, t_ptr, s_ptr, b_ptr, y_ptr, M, N, K, x_sm, w_sn, s_sn, bn, bk,
                  KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    rows = w_ptr + rn[:, None].to(tl.int64) * w_sn
    srows = s_ptr + (rn // bn)[:, None].to(tl.int64) * s_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_sm + kk[None, :], mask=mm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        wm = nm[:, None] & km[None, :]
        if KIND == 0:
            w = e4m3_to_f32(tl.load(rows + kk[None, :], mask=wm, other=0).to(tl.int32))
        elif KIND == 1:
            w = tl.load(rows + kk[None, :], mask=wm, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        else:
            byte = tl.load(rows + (kk // 2)[None, :], mask=wm, other=0).to(tl.int32)
            code = (byte >> (4 - 4 * (kk % 2))[None, :]) & 0xF
            w = tl.load(t_ptr + code, mask=wm, other=0.0).to(tl.float32)
        s = tl.load(srows + (kk // bk)[None, :], mask=wm, other=0.0).to(tl.float32)
        w = tl.where(wm, w * s, 0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def _block_scaled(op: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  block: tuple[int, int] | None, out_f32: bool, table: torch.Tensor | None = None) -> torch.Tensor:
    per_byte = 2 if table is not None else 1
    n = weight.shape[0] if weight.dim() == 2 else 0
    K = x.shape[-1] if x.dim() else -1
    bn, bk = block if block is not None else (max(n, 1), max(K, 1))
    if (not runs_here(x, weight, scale, bias, table) or x.dim() == 0 or x.dtype not in DTYPES
            or weight.dim() != 2 or weight.element_size() != 1 or weight.dtype == torch.bool
            or weight.stride(-1) != 1 or weight.shape[1] * per_byte != K + (K % 2 if table is not None else 0)
            or bn <= 0 or bk <= 0 or scale.numel() != -(-n // bn) * -(-K // bk) or scale.requires_grad
            or (table is not None and table.numel() != 16)
            or (bias is not None and bias.shape != (n,))):
        extra = () if table is None else (table,)
        return lookup_reference(op)(x, weight, *extra, scale, bias, block=block, out_f32=out_f32)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    s2 = scale.reshape(-(-n // bn), -(-K // bk)).contiguous()
    y = torch.empty((M, n), dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
    if M and n:
        t = table.to(torch.float32).contiguous() if table is not None else s2
        _widen_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(n, BLOCK_N))](
            x2, weight.view(torch.uint8), t, s2, bias if bias is not None else y, y, M, n, K, x2.stride(0),
            weight.stride(0), s2.stride(0), bn, bk, KIND=KINDS[op], HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
    return y.reshape(*x.shape[:-1], n)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               block: tuple[int, int] | None = None, out_f32: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` for E4M3 weights (uint8 bit patterns, or float8_e4m3fn, [N, K]) with block scales."""
    return _block_scaled("linear_fp8", x, weight, scale, bias, block, out_f32)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                block: tuple[int, int] | None = None, out_f32: bool = False) -> torch.Tensor:
    """`linear_fp8` for int8 weights [N, K]."""
    return _block_scaled("linear_int8", x, weight, scale, bias, block, out_f32)


def linear_lut4(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, block: tuple[int, int] | None = None,
                out_f32: bool = False) -> torch.Tensor:
    """`linear_fp8` for 4-bit codes [N, ceil(K / 2)] (the first in the high nibble) looked up in `table` [16]."""
    return _block_scaled("linear_lut4", x, packed, scale, bias, block, out_f32, table=table)
