"""Importance-matrix (imatrix) weighted GGML quantizers: llama.cpp's ``quant_weights`` paths, in torch.

llama.cpp quantizes a weight ``[out, in]`` with an importance vector ``qw[in]`` (``llama-imatrix``:
the mean squared activation of each input column) by running ``quantize_row_*_impl`` instead of
``quantize_row_*_ref``. These are ports of those, vectorized over all blocks of a tile like
`kquants`, with the same float32 discipline (products rounded before they are added, sequential
sums in C's order, ``nearest_int``, C's ``c / t``, correctly rounded sqrtf), so the bytes are
llama.cpp's (``ggml-quants.c``, compiled without FMA contraction) on all but a few blocks:

- q2k, q4k, q5k: per-value weights ``qw * sqrtf(sigma2 + x*x)`` (``sigma2`` from the super-block:
  ``sum(x*x)/256``, twice that for q4k/q5k), sub-block scale and min from ``make_qkx3_quants``
  (the weighted least-squares search of `kquants.make_qkx2_quants`, 37 steps from ``-0.9``), then
  the 4/6-bit super-block scales from ``make_qp_quants`` weighted by each sub-block's weight sum;
- q3k: the same weights (``2*sum(x*x)/256``), ``make_qx_quants`` with them per sub-block, and
  ``make_qx_quants`` weighted by the sub-block weight sums for the 6-bit scales;
- q6k: ``make_qx_quants`` with ``qw`` itself as the weights (llama.cpp's ``sigma2`` term is
  commented out there), the rest as the reference;
- q4_0, q5_0: ``make_qx_quants`` per 32-block, q4_1, q5_1: ``make_qkx3_quants``, with the weights
  ``qw * sqrtf(sigma2 + x*x)`` where ``sigma2`` is the mean square of the whole row (the caller
  passes it: `row_sigma2`); no re-quantization afterwards, as in C.

q8_0, q8_1 and q8k have no weighted path in llama.cpp (``quant_weights`` is ignored); neither here.
Every quantizer takes ``x``, ``qw`` ``[N, block]`` float32 (the importance already laid out per
value) and returns ``uint8 [N, type_size]``; inputs are only read.
"""

from __future__ import annotations

import numpy as np
import torch

from . import kquants as K
from .kquants import GROUP_MAX_EPS, nearest_int

_RMIN = K._f32(-0.9)
_RDELTA = K._f32(0.05)
_NSTEP = 36


# ---------------------------------------------------------------------------- shared pieces


def row_sigma2(w: torch.Tensor, rows_per_chunk: int | None = None) -> torch.Tensor:
    """``sum_x2/n_per_row`` of ``quantize_row_q4_0_impl`` (and q4_1, q5_0, q5_1) for each row of
    `w` ``[rows, cols]`` (any float dtype, read only): float32 [rows], the sum sequential in C's
    order. Computed a chunk of rows at a time (about 2M values: one 8 MB temporary)."""
    rows, cols = w.shape
    step = rows_per_chunk or max(1, (1 << 21) // cols)
    out = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, step):
        chunk = w[r0:r0 + step]
        sq = torch.empty(cols, chunk.shape[0], dtype=torch.float32)  # one row of terms per step of the C loop
        sq.copy_(chunk.t())
        sq.mul_(sq)
        acc = sq[0] + 0.0
        for j in range(1, cols):
            acc += sq[j]
        out[r0:r0 + step] = acc / float(cols)
    return out


def _sqrt_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])``; sigma2 [N, 1]."""
    return qw * K._sqrtf(sigma2 + x * x)


def _block_sigma2(x: torch.Tensor, twice: bool) -> torch.Tensor:
    """A super-block's ``sumx2/QK_K`` (``2*sumx2/QK_K`` when `twice`), as [N, 1]."""
    s = K._seqsum((x * x).t())
    if twice:
        s = s * 2.0
    return (s / float(K.QK_K))[:, None]


def make_qp_quants(xg: torch.Tensor, nmax: int, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` over many groups (`xg`, `wg`: ``[B, n]``):
    the non-negative values x (sub-block scales or mins) as ``scale * L`` with L in 0..nmax,
    minimizing the weighted squared error. Returns ``(L int32 [B, n] (C's uint8_t values), scale [B])``."""
    xT = xg.t().contiguous()
    wT = wg.t().contiguous()
    n, B = xT.shape
    mx = K._pos_max(xT, 0)  # max = MAX(max, x[i]) from 0
    zero_group = mx < GROUP_MAX_EPS
    iscale = K._rdiv(float(nmax), mx)
    scale = K._rdiv(1.0, iscale)
    L0 = (nearest_int(iscale * xT) & 0xFF).float()  # stored in uint8_t
    diff = xT - scale * L0
    best = K._seqsum(wT * diff * diff)
    for s in range(-4, 5):
        if s == 0:
            continue
        c = float(np.float32(0.1) * np.float32(s) + np.float32(nmax))
        isc = K._rdiv(c, mx)
        sc = K._rdiv(1.0, isc)
        lq = nearest_int(isc * xT).clamp_(max=nmax).float()
        diff = xT - sc * lq
        mse = K._seqsum(wT * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    li = nearest_int(iscale * xT).clamp_(max=nmax)  # int l: the sums use it as it is
    wx = wT * xT
    sumlx = K._seqsum(wx * li)
    suml2 = K._seqsum(wT * li * li)
    L = (li & 0xFF).float()  # L[i] = l (uint8_t)
    for _itry in range(5):
        changed = torch.zeros(B, dtype=torch.bool)
        for i in range(n):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - wT[i] * Li * Li
            new_l = nearest_int(xT[i] * sl2 / slx).clamp_(max=nmax).float()
            nslx = slx + wx[i] * new_l
            nsl2 = sl2 + wT[i] * new_l * new_l
            upd = (slx > 0) & (sl2 > 0) & (new_l != Li) & (nslx * nslx * suml2 > sumlx * sumlx * nsl2)
            L[i] = torch.where(upd, new_l.to(torch.int32).bitwise_and_(0xFF).float(), Li)
            sumlx = torch.where(upd, nslx, sumlx)
            suml2 = torch.where(upd, nsl2, suml2)
            changed |= upd
        # A group whose pass changed nothing is done (C breaks; another pass would change
        # nothing either), so passes can run on every group until none changes.
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    zero = torch.zeros_like(scale)
    scale = torch.where(zero_group, zero, scale)
    L = torch.where(zero_group[None, :], torch.zeros_like(L), L)
    return L.t().to(torch.int32), scale


def make_qkx3_quants(xT: torch.Tensor, wT: torch.Tensor, nmax: int):
    """``make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, -0.9f, 0.05f, 36, false)`` over
    the sub-blocks (columns) of `xT`, `wT` ``[n, B]``: with weights, it is ``make_qkx2_quants``
    (``max <= min`` and ``max == min`` coincide once ``min <= 0``). Returns (L [n, B], scale, the_min)."""
    return K.make_qkx2_quants(xT, wT, nmax, _RMIN, _RDELTA, _NSTEP, False)


def _unpack_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7 of the packed bytes (uint8 [N, 12]) -> (sc, m) int32 [N, 8]."""
    s = s.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc, m


# ---------------------------------------------------------------------------- k-quants


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_impl: [N, 256] -> uint8 [N, 84]."""
    N = x.shape[0]
    weight = _sqrt_weights(x, qw, _block_sigma2(x, twice=False))
    xT = K._subblocks(x, 16)
    wT = K._subblocks(weight, 16)
    sw = K._seqsum(wT).reshape(N, 16)
    L, scales, mins = make_qkx3_quants(xT, wT, 3)
    L = L.t().reshape(N, 16, 16).to(torch.int32)
    Ls, dm = make_qp_quants(scales.reshape(N, 16), 15, sw)
    Lm, mm = make_qp_quants(mins.reshape(N, 16), 15, sw)
    sc = (Ls | (Lm << 4)) & 0xFF
    d = K._fp16_round(dm)[:, None] * (sc & 0xF).float()
    m = K._fp16_round(mm)[:, None] * (sc >> 4).float()
    L = K._requant(x.reshape(N, 16, 16), d, m, 0, 3, L)
    out = torch.empty(N, 84, dtype=torch.uint8)
    out[:, 0:16] = sc.to(torch.uint8)
    out[:, 16:80] = K._pack_2bit(L.reshape(N, 256).to(torch.uint8))
    out[:, 80:82] = K._fp16_bytes(dm)
    out[:, 82:84] = K._fp16_bytes(mm)
    return out


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_impl: [N, 256] -> uint8 [N, 110]."""
    N = x.shape[0]
    weight = _sqrt_weights(x, qw, _block_sigma2(x, twice=True))
    sw = K._seqsum(K._subblocks(weight, 16)).reshape(N, 16)
    L, scales = K.make_qx_quants_rmse1(x.reshape(-1, 16), 4, weight.reshape(-1, 16))
    L = L.t().reshape(N, 16, 16).to(torch.int32)
    Ls, d_block = K.make_qx_quants_rmse1(scales.reshape(N, 16), 32, sw)
    ls = Ls.t().to(torch.int32)  # [N, 16] in 0..63 (l + 32)
    d = K._fp16_round(d_block)[:, None] * (ls - 32).float()
    L = K._requant(x.reshape(N, 16, 16), d, None, -4, 3, L - 4) + 4
    L = L.reshape(N, 256)
    high = L > 3
    hmask = K._bitplanes(high.to(torch.uint8).reshape(N, 8, 32))
    L = torch.where(high, L - 4, L)
    out = torch.empty(N, 110, dtype=torch.uint8)
    out[:, 0:32] = hmask
    out[:, 32:96] = K._pack_2bit(L.to(torch.uint8))
    lu = ls.to(torch.uint8)
    sc = torch.empty(N, 12, dtype=torch.uint8)
    sc[:, 0:8] = (lu[:, 0:8] & 0xF) | ((lu[:, 8:16] & 0xF) << 4)
    hi = (lu >> 4).reshape(N, 4, 4)  # [N, j/4, j%4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    out[:, 96:108] = sc
    out[:, 108:110] = K._fp16_bytes(d_block)
    return out


def _quantize_q45_k(x: torch.Tensor, qw: torch.Tensor, nmax: int):
    """The shared part of quantize_row_q4_K_impl / q5_K_impl: (L int32 [N, 256], scales uint8 [N, 12], d, dmin)."""
    N = x.shape[0]
    weight = _sqrt_weights(x, qw, _block_sigma2(x, twice=True))
    xT = K._subblocks(x, 32)
    wT = K._subblocks(weight, 32)
    sw = K._seqsum(wT).reshape(N, 8)
    L, scales, mins = make_qkx3_quants(xT, wT, nmax)
    L = L.t().reshape(N, 8, 32).to(torch.int32)
    Ls, d_block = make_qp_quants(scales.reshape(N, 8), 63, sw)
    Lm, m_block = make_qp_quants(mins.reshape(N, 8), 63, sw)
    if nmax == 31:  # q5_K_impl: ls = MIN(63, ls) (q4_K_impl stores Ls as it is)
        Ls, Lm = Ls.clamp(max=63), Lm.clamp(max=63)
    packed = K._pack_scales_k4(Ls.to(torch.uint8), Lm.to(torch.uint8))
    sc, m = _unpack_scale_min_k4(packed)
    d = K._fp16_round(d_block)[:, None] * sc.float()
    dm = K._fp16_round(m_block)[:, None] * m.float()
    L = K._requant(x.reshape(N, 8, 32), d, dm, 0, nmax, L).reshape(N, 256)
    return L, packed, d_block, m_block


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_K_impl: [N, 256] -> uint8 [N, 144]."""
    N = x.shape[0]
    L, sc, d16, m16 = _quantize_q45_k(x, qw, 15)
    q = L.to(torch.uint8).reshape(N, 4, 2, 32)
    out = torch.empty(N, 144, dtype=torch.uint8)
    out[:, 0:2] = K._fp16_bytes(d16)
    out[:, 2:4] = K._fp16_bytes(m16)
    out[:, 4:16] = sc
    out[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, 128)
    return out


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_K_impl: [N, 256] -> uint8 [N, 176]."""
    N = x.shape[0]
    L, sc, d16, m16 = _quantize_q45_k(x, qw, 31)
    q = L.to(torch.uint8).reshape(N, 8, 32)
    qh = K._bitplanes(q >> 4)
    lo = (q & 0xF).reshape(N, 4, 2, 32)
    out = torch.empty(N, 176, dtype=torch.uint8)
    out[:, 0:2] = K._fp16_bytes(d16)
    out[:, 2:4] = K._fp16_bytes(m16)
    out[:, 4:16] = sc
    out[:, 16:48] = qh
    out[:, 48:176] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(N, 128)
    return out


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q6_K_impl: [N, 256] -> uint8 [N, 210]."""
    return K.quantize_q6_k(x, qw)


# ---------------------------------------------------------------------------- 32-blocks


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``qs[j] = (L[j] & 0xF) | (L[j+16] & 0xF) << 4``: int [N, 32] -> uint8 [N, 16]."""
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).to(torch.uint8)


def _qh(q: torch.Tensor) -> torch.Tensor:
    """The little-endian uint32 of bit 4 of each L[j] at bit j: int [N, 32] -> uint8 [N, 4]."""
    bits = ((q >> 4) & 1).to(torch.uint8).reshape(-1, 4, 8)
    out = bits[:, :, 0].clone()
    for k in range(1, 8):
        out |= bits[:, :, k] << k
    return out


def _qx_block(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    L, d = K.make_qx_quants_rmse1(x, nmax, _sqrt_weights(x, qw, sigma2))
    return L.t().to(torch.int32), d


def _qkx3_block(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, nmax: int):
    w = _sqrt_weights(x, qw, sigma2)
    L, d, the_min = make_qkx3_quants(x.t().contiguous(), w.t().contiguous(), nmax)
    return L.t().to(torch.int32), d, -the_min


def quantize_q4_0(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_impl: [N, 32] -> uint8 [N, 18]; `sigma2` [N, 1] is the row's (`row_sigma2`)."""
    L, d = _qx_block(x, qw, sigma2, 8)
    return torch.cat([K._fp16_bytes(d), _nibbles(L)], 1)


def quantize_q5_0(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_0_impl: [N, 32] -> uint8 [N, 22]."""
    L, d = _qx_block(x, qw, sigma2, 16)
    return torch.cat([K._fp16_bytes(d), _qh(L), _nibbles(L)], 1)


def quantize_q4_1(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_1_impl: [N, 32] -> uint8 [N, 20] (d, m = -the_min)."""
    L, d, m = _qkx3_block(x, qw, sigma2, 15)
    return torch.cat([K._fp16_bytes(d), K._fp16_bytes(m), _nibbles(L)], 1)


def quantize_q5_1(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_1_impl: [N, 32] -> uint8 [N, 24]."""
    L, d, m = _qkx3_block(x, qw, sigma2, 31)
    return torch.cat([K._fp16_bytes(d), K._fp16_bytes(m), _qh(L), _nibbles(L)], 1)


# Types with a weighted path, and whether it takes the row's sigma2.
ROW_SIGMA2 = {"q4_0": quantize_q4_0, "q4_1": quantize_q4_1, "q5_0": quantize_q5_0, "q5_1": quantize_q5_1}
SUPERBLOCK = {"q2k": quantize_q2_k, "q3k": quantize_q3_k, "q4k": quantize_q4_k, "q5k": quantize_q5_k,
              "q6k": quantize_q6_k}
WEIGHTED_TYPES = frozenset(ROW_SIGMA2) | frozenset(SUPERBLOCK)
