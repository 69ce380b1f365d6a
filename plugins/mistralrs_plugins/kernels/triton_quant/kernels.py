"""Triton dequantize-matmul of GGML blocks: ``qmatmul_<type>(x[..., K], qweight uint8[N, row_bytes], bias,
*, out_f32=False) -> y[..., N]`` for q4_0, q8_0, q2_K, q3_K, q4_K, q5_K and q6_K.

Grid: tiles of ``BLOCK_M`` rows of x by ``BLOCK_N`` output features. Along K, each step dequantizes the
``BLOCK_K`` weights of each feature in registers straight from the block bytes (`triton_ggml.dequant_tile`:
the torch reference's arithmetic, `quant/ggml/formats`) and accumulates ``x @ w.T`` in fp32 (full-precision
dots, so the result is the reference's up to the fp32 summation order). The bias is added in fp32; the result
is rounded once to x's dtype (or kept fp32 with ``out_f32``). Anything the kernels do not take goes to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from mistralrs.nn.kernels import lookup_reference
from mistralrs_plugins.kernels.triton_ggml import FORMATS, dequant_tile
from mistralrs_plugins.kernels.triton_support import runs_here

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 64


@triton.jit
def _qmatmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, x_sm, row_bytes,
                    FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    rows = w_ptr + rn[:, None].to(tl.int64) * row_bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_sm + kk[None, :], mask=mm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        wm = nm[:, None] & km[None, :]
        w = dequant_tile(rows, kk, wm, FMT)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def _make(name: str) -> Callable[..., torch.Tensor]:
    fmt, elems, nbytes = FORMATS[name]

    def qmatmul(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
        K = x.shape[-1]
        if (not runs_here(x, qweight, bias) or qweight.dtype != torch.uint8 or qweight.dim() != 2
                or K % elems or qweight.shape[1] != K // elems * nbytes or qweight.stride(-1) != 1
                or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
                or (bias is not None and bias.shape != (qweight.shape[0],))):
            return lookup_reference(f"qmatmul_{name}")(x, qweight, bias, out_f32=out_f32)
        N = qweight.shape[0]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
        if M and N:
            _qmatmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
                x2, qweight, bias if bias is not None else y, y, M, N, K, x2.stride(0), qweight.stride(0),
                FMT=fmt, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            )
        return y.reshape(*x.shape[:-1], N)

    qmatmul.__name__ = qmatmul.__qualname__ = f"qmatmul_{name}"
    return qmatmul


qmatmul_q4_0 = _make("q4_0")
qmatmul_q8_0 = _make("q8_0")
qmatmul_q4k = _make("q4k")
qmatmul_q5k = _make("q5k")
qmatmul_q6k = _make("q6k")
qmatmul_q2k = _make("q2k")
qmatmul_q3k = _make("q3k")
