"""Triton dequantize-matmul of GGML blocks: ``qmatmul_<type>(x[..., K], qweight uint8[N, row_bytes], bias,
*, out_f32=False) -> y[..., N]`` for q4_0, q8_0, q2_K, q3_K, q4_K, q5_K and q6_K.

Grid: tiles of ``BLOCK_M`` rows of x by ``BLOCK_N`` output features. Along K, each step gathers the bytes
of ``BLOCK_K`` weights per feature straight from the block layout (fp16 scales assembled from their two
bytes, nibbles shifted out, q4_K's 6-bit sub-block scales and mins unpacked), dequantizes them in fp32 as
the torch reference does (`quant/ggml/formats`: ``(q - 8) * d``, ``q * d``, ``d * sc * q - dmin * m`` with q5_K's
fifth bit, ``d * sc * (q - 32)`` for q6_K's 6-bit quants, q2_K's ``d * sc * q - dmin * m`` on 2-bit quants
with 4-bit scales and mins, q3_K's ``d * (sc - 32) * (q - 4 * !hbit)`` with 6-bit scales) and
accumulates ``x @ w.T`` in fp32 (full-precision dots, so the result is the reference's up to the fp32
summation order). The bias is added in fp32; the result is rounded once to x's dtype (or kept fp32 with
``out_f32``). Anything the kernels do not take goes to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from mistralrs.nn.kernels import lookup_reference
from mistralrs_plugins.kernels.triton_support import runs_here

# name -> (format id in the kernel, block elements, block bytes)
FORMATS = {"q4_0": (0, 32, 18), "q8_0": (1, 32, 34), "q4k": (2, 256, 144), "q5k": (3, 256, 176),
           "q6k": (4, 256, 210), "q2k": (5, 256, 84), "q3k": (6, 256, 110)}
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 64


@triton.jit
def _fp16_at(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


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
        if FMT == 0:  # q4_0: fp16 d, 16 bytes of nibbles (low: elements 0-15, high: 16-31)
            b = kk // 32
            j = kk % 32
            base = rows + (b * 18)[None, :]
            d = _fp16_at(base, wm)
            byte = tl.load(base + (2 + j % 16)[None, :], mask=wm, other=0).to(tl.int32)
            q = (byte >> ((j // 16) * 4)[None, :]) & 0xF
            w = (q - 8).to(tl.float32) * d
        elif FMT == 1:  # q8_0: fp16 d, 32 int8
            b = kk // 32
            j = kk % 32
            base = rows + (b * 34)[None, :]
            d = _fp16_at(base, wm)
            q = tl.load(base + (2 + j)[None, :], mask=wm, other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32) * d
        elif FMT == 4:  # q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d
            b = kk // 256
            e = kk % 256
            half = e // 128
            grp = (e % 128) // 32  # four groups of 32 per half
            lane = e % 32
            base = rows + (b * 210)[None, :]
            d = _fp16_at(base + 208, wm)
            lo = tl.load(base + (half * 64 + (grp % 2) * 32 + lane)[None, :], mask=wm, other=0).to(tl.int32)
            hi = tl.load(base + (128 + half * 32 + lane)[None, :], mask=wm, other=0).to(tl.int32)
            q = ((lo >> ((grp // 2) * 4)[None, :]) & 0xF) | (((hi >> (2 * grp)[None, :]) & 3) << 4)
            sc = tl.load(base + (192 + half * 8 + grp * 2 + lane // 16)[None, :], mask=wm,
                         other=0).to(tl.int8, bitcast=True)
            w = (d * sc.to(tl.float32)) * (q - 32).to(tl.float32)
        elif FMT == 5:  # q2_K: 16 scale/min bytes (low nibble scale, high min), 64 bytes of 2-bit quants, d, dmin
            b = kk // 256
            e = kk % 256
            base = rows + (b * 84)[None, :]
            d = _fp16_at(base + 80, wm)
            dmin = _fp16_at(base + 82, wm)
            s = tl.load(base + (e // 16)[None, :], mask=wm, other=0).to(tl.int32)
            # element 128h + 32j + l: bits 2j..2j+1 of quant byte 32h + l
            byte = tl.load(base + (16 + (e // 128) * 32 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
            q = (byte >> (2 * ((e % 128) // 32))[None, :]) & 3
            w = (d * (s & 0xF).to(tl.float32)) * q.to(tl.float32) - dmin * (s >> 4).to(tl.float32)
        elif FMT == 6:  # q3_K: 32 bytes of high bits, 64 of 2-bit quants, 12 of 6-bit scales, fp16 d
            b = kk // 256
            e = kk % 256
            j = e // 16  # sub-block of 16
            base = rows + (b * 110)[None, :]
            d = _fp16_at(base + 108, wm)
            s_lo = tl.load(base + (96 + j % 8)[None, :], mask=wm, other=0).to(tl.int32)
            s_hi = tl.load(base + (104 + j % 4)[None, :], mask=wm, other=0).to(tl.int32)
            low = tl.where((j < 8)[None, :], s_lo & 0xF, s_lo >> 4)
            sc = (low | (((s_hi >> (2 * (j // 4))[None, :]) & 3) << 4)) - 32
            byte = tl.load(base + (32 + (e // 128) * 32 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
            q = (byte >> (2 * ((e % 128) // 32))[None, :]) & 3
            hm = tl.load(base + (e % 32)[None, :], mask=wm, other=0).to(tl.int32)
            q -= 4 * (1 - ((hm >> (e // 32)[None, :]) & 1))  # bit e / 32 of hmask[e % 32] unset: minus 4
            w = (d * sc.to(tl.float32)) * q.to(tl.float32)
        else:  # q4_K / q5_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, (q5_K: 32 bytes of fifth bits,)
            # 128 bytes of nibbles
            b = kk // 256
            e = kk % 256
            sub = e // 32
            base = rows + (b * (144 if FMT == 2 else 176))[None, :]
            d = _fp16_at(base, wm)
            dmin = _fp16_at(base + 2, wm)
            lowsub = (sub < 4)[None, :]
            s_a = tl.load(base + (4 + sub)[None, :], mask=wm, other=0).to(tl.int32)  # s[j]
            s_b = tl.load(base + (4 + (sub + 4) % 12)[None, :], mask=wm, other=0).to(tl.int32)  # s[j + 4]
            s_c = tl.load(base + (4 + (sub + 8) % 12)[None, :], mask=wm, other=0).to(tl.int32)  # s[j - 4]
            sc = tl.where(lowsub, s_a & 63, (s_b & 0xF) | ((s_c >> 6) << 4))
            mn = tl.where(lowsub, s_b & 63, (s_b >> 4) | ((s_a >> 6) << 4))
            qs = 16 if FMT == 2 else 48
            byte = tl.load(base + (qs + (sub // 2) * 32 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
            q = (byte >> ((sub % 2) * 4)[None, :]) & 0xF
            if FMT == 3:
                high = tl.load(base + (16 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
                q += ((high >> sub[None, :]) & 1) * 16
            w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        w = tl.where(wm, w, 0.0)
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
