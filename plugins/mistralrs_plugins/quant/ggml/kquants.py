"""The k-quant quantizers (Q2_K..Q6_K, Q8_K): llama.cpp's reference C code, vectorized in torch.

Ports of ``quantize_row_q{2..6,8}_K_ref`` and the searches they call (``make_qkx2_quants``,
``make_q3_quants``, ``make_qx_quants``) from ``ggml/src/ggml-quants.c``. Every input is a float32
tensor of super-blocks ``[N, 256]``; every output is ``uint8 [N, type_size]``, laid out as
llama.cpp's ``block_q*_K`` structs (ggml-common.h).

Bit-exactness with the C code (compiled without FMA contraction) comes from doing the float32
arithmetic in the same order: every product is rounded before it is added, sums run sequentially
over a block's elements (a Python loop over the 16 or 32 elements of a sub-block, each step one op
over all sub-blocks of the tile), ``nearest_int`` is the same round-half-to-even, fp16 scales are
rounded before they are used, and a search step replaces the best so far only when strictly
better, as the C loops do. ``make_qkx2_quants``'s steps run one after the other (a step that wins
moves ``min``, which the next steps quantize against); ``make_qx_quants``'s steps are independent
and are evaluated together, then chosen in order.

Two float32 operations are avoided because torch's CPU kernels do not round them like C:
``c / tensor`` (torch computes ``reciprocal(t) * c``; `_rdiv` divides instead) and ``torch.sqrt``
(not correctly rounded; `_sqrtf` goes through float64, which is).

Inputs are read, never written: they may be views of the caller's (read-only) weights.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0  # 1.5 * 2**23: nearest_int's rounding constant


# ---------------------------------------------------------------------------- float helpers


def nearest_int(t: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int`` bit for bit, as int32: round half to even for |t| <= 4194303,
    and the same wrapped bits as the C code outside that range (where C asserts)."""
    v = t + _MAGIC
    return (v.view(torch.int32) & 0x7FFFFF) - 0x400000


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` in float32 with one rounding (Python's ``c / t`` is ``reciprocal(t) * c``)."""
    return torch.full_like(t, c).div_(t)


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (torch's CPU float32 sqrt is not)."""
    return t.double().sqrt_().float()


def _f32(v: float) -> float:
    """A Python float holding the float32 value `v` (exact in both)."""
    return float(np.float32(v))


def _fp16_round(t: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(t))."""
    return t.to(torch.float16).float()


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 [N] -> uint8 [N, 2], the little-endian fp16 (round to nearest even)."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _seqsum(terms: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for (i...) s += terms[i];`` over dim 0, in that order."""
    acc = terms[0] + 0.0
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``amax`` and ``max`` of the C loops ``if (fabsf(x) > amax) { amax = fabsf(x); max = x; }``
    over each row of `x` ``[B, n]`` (from 0): the first value of largest magnitude, +0.0 when all are 0."""
    ax = x.abs()
    idx = ax.argmax(1, keepdim=True)  # the first maximum
    amax = ax.gather(1, idx)[:, 0]
    mx = x.gather(1, idx)[:, 0]
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))
    return amax, mx


def _pos_max(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``float m = 0; if (t > m) m = t;``: the largest positive value, else +0.0."""
    m = t.amax(dim)
    return torch.where(m > 0, m, torch.zeros_like(m))


# ---------------------------------------------------------------------------- searches


def make_qkx2_quants(xT: torch.Tensor, wT: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` over many sub-blocks at once.

    `xT`, `wT`: ``[n, B]`` (element-major: column b is one sub-block of n values and its weights).
    Returns ``(L [n, B] float, scale [B], the_min [B])``.

    The search steps run in order, as in C: a step that wins replaces ``min``, and the later
    steps quantize against the new ``min``."""
    n, B = xT.shape
    mn = xT.amin(0)
    mx = xT.amax(0)
    sum_w = wT[0] + 0.0
    sum_x = wT[0] * xT[0]
    for i in range(1, n):
        sum_w += wT[i]
        sum_x += wT[i] * xT[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    flat_min = mn

    iscale = _rdiv(float(nmax), mx - mn)
    scale = _rdiv(1.0, iscale)
    la = torch.sub(xT, mn)
    la *= iscale
    la = nearest_int(la).clamp_(0, nmax).float()
    la *= scale
    la += mn
    la -= xT
    if use_mad:
        la.abs_()
    else:
        la *= la
    la *= wT
    best = _seqsum(la)

    # L is not kept per step: the winner's L is recomputed at the end from the iscale and min it
    # was quantized with (`l_isc`, `l_min`).
    l_isc, l_min = iscale, mn
    terms = torch.empty(n, 3, B, dtype=torch.float32)
    acc = torch.empty(3, B, dtype=torch.float32)
    term_rows, la_rows = terms.unbind(0), la.unbind(0)  # views made once: the buffers are reused
    for s in range(nstep + 1):
        c = float(np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax))
        isc = _rdiv(c, mx - mn)
        torch.sub(xT, mn, out=la)
        la *= isc
        if bool(torch.isfinite(isc).all()):
            la.round_().clamp_(0, nmax)  # = nearest_int here: |la| <= nmax + 1
        else:  # a range too small for float32 (subnormal): C's nearest_int of inf and NaN
            la.copy_(nearest_int(la).clamp_(0, nmax))
        wl = terms[:, 0]
        torch.mul(la, wT, out=wl)
        torch.mul(wl, la, out=terms[:, 1])
        torch.mul(wl, xT, out=terms[:, 2])
        torch.add(term_rows[0], 0.0, out=acc)
        for t in term_rows[1:]:
            acc += t
        sum_l, sum_l2, sum_xl = acc.unbind(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        la *= this_scale
        la += this_min
        la -= xT
        if use_mad:
            la.abs_()
        else:
            la *= la
        la *= wT
        cur = la_rows[0] + 0.0
        for t in la_rows[1:]:
            cur += t
        win = (D > 0) & (cur < best)
        best = torch.where(win, cur, best)
        scale = torch.where(win, this_scale, scale)
        l_isc = torch.where(win, isc, l_isc)
        l_min = torch.where(win, mn, l_min)
        mn = torch.where(win, this_min, mn)
    torch.sub(xT, l_min, out=la)
    la *= l_isc
    L = nearest_int(la).clamp_(0, nmax).float()
    zero = torch.zeros_like(scale)
    L = torch.where(flat, zero, L)
    scale = torch.where(flat, zero, scale)
    mn = torch.where(flat, flat_min, mn)
    return L, scale, -mn


def make_qx_quants_rmse1(xg: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` over many groups (`xg`: ``[B, n]``; `qw`:
    the weights ``[B, n]``, or None for C's NULL: ``x*x``). Returns ``(L [n, B] float in [0, 2*nmax), scale [B])``."""
    amax, mx = _first_absmax(xg)
    xT = xg.t().contiguous()
    n = xT.shape[0]
    zero_group = amax < GROUP_MAX_EPS
    consts = [np.float32(-nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(s)) for s in range(-9, 10) if s]
    consts_t = torch.from_numpy(np.array(consts, dtype=np.float32))
    isc = consts_t[:, None] / mx[None, :]  # [S, B]
    w = xT * xT if qw is None else qw.t().contiguous()
    wx = w * xT
    Ls = torch.empty((n,) + tuple(isc.shape), dtype=torch.float32)
    sumlx = torch.zeros_like(isc)
    suml2 = torch.zeros_like(isc)
    tmp = torch.empty_like(isc)
    for i in range(n):
        li = Ls[i]
        torch.mul(isc, xT[i], out=li)
        li.round_().clamp_(-nmax, nmax - 1)
        torch.mul(li, wx[i], out=tmp)
        sumlx += tmp
        torch.mul(li, w[i], out=tmp)
        tmp *= li
        suml2 += tmp
    # step 0 is the first quantization; steps 1.. are is = -9..9 (no 0), taken when strictly better
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(mx))
    best = scale * sumlx[0]
    pick = torch.zeros(mx.shape, dtype=torch.int64)
    for s in range(1, isc.shape[0]):
        slx, sl2 = sumlx[s], suml2[s]
        take = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / sl2
        scale = torch.where(take, new_scale, scale)
        best = torch.where(take, new_scale * slx, best)
        pick = torch.where(take, s, pick)
    L = Ls.gather(1, pick[None, None].expand(n, 1, *pick.shape))[:, 0] + nmax
    zero = torch.zeros_like(scale)
    L = torch.where(zero_group, zero, L)
    scale = torch.where(zero_group, zero, scale)
    return L, scale


def make_q3_quants_rmse(xg: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` over many groups (`xg`: ``[B, n]``).
    Returns ``(L [n, B] float in [0, 2*nmax), scale [B])``."""
    amax, mx = _first_absmax(xg)
    xT = xg.t().contiguous()
    n, B = xT.shape
    zero_group = amax < GROUP_MAX_EPS
    iscale = _rdiv(float(-nmax), mx)
    w = xT * xT
    wx = w * xT
    L = (iscale * xT).round_().clamp_(-nmax, nmax - 1)
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum(w * L * L)
    # The refinement visits the elements in order, each update changing the sums the next one
    # sees. Groups where a whole pass changes nothing are finished (another pass would repeat
    # it), so each pass runs only on the groups still changing.
    active = None  # all groups (the first pass works on L and the sums in place)
    aL, ax, aw, awx, slx_a, sl2_a = L, xT, w, wx, sumlx, suml2
    for _itry in range(5):
        changed = torch.zeros(aL.shape[1], dtype=torch.bool)
        for i in range(n):
            li = aL[i]
            slx = slx_a - awx[i] * li
            sl2 = sl2_a - aw[i] * li * li
            new_l = nearest_int(ax[i] * sl2 / slx).clamp_(-nmax, nmax - 1).float()
            nslx = slx + awx[i] * new_l
            nsl2 = sl2 + aw[i] * new_l * new_l
            upd = (slx > 0) & (new_l != li) & (nsl2 > 0) & (nslx * nslx * sl2_a > slx_a * slx_a * nsl2)
            torch.where(upd, new_l, li, out=li)
            slx_a = torch.where(upd, nslx, slx_a)
            sl2_a = torch.where(upd, nsl2, sl2_a)
            changed |= upd
        if active is None:
            sumlx, suml2 = slx_a, sl2_a
            active = torch.arange(B)
        else:  # write back
            L[:, active] = aL
            sumlx[active] = slx_a
            suml2[active] = sl2_a
        if not bool(changed.any()):
            break
        active = active[changed]
        aL, ax, aw, awx = L[:, active], xT[:, active], w[:, active], wx[:, active]
        slx_a, sl2_a = sumlx[active], suml2[active]
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    L = L + nmax
    zero = torch.zeros_like(scale)
    L = torch.where(zero_group, zero, L)
    scale = torch.where(zero_group, zero, scale)
    return L, scale


# ---------------------------------------------------------------------------- packing helpers


def _bitplanes(bits: torch.Tensor) -> torch.Tensor:
    """OR of ``bits[:, k] << k`` over dim 1 (0/1 values, uint8 [N, 8, M] -> [N, M])."""
    out = bits[:, 0].clone()
    for k in range(1, 8):
        out |= bits[:, k] << k
    return out


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6`` for j = 0, 128:
    uint8 [N, 256] -> [N, 64]."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12-byte 6-bit scales/mins of Q4_K/Q5_K (ls, lm: uint8 [N, 8] in 0..63)."""
    s = torch.empty(ls.shape[0], 12, dtype=torch.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return s


def _requant(xs: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int, L: torch.Tensor) -> torch.Tensor:
    """``if (!d) continue; l = nearest_int((x + dm)/d)`` clamped to [lo, hi]; where d == 0 the
    search's L stays. xs, L: [N, G, n]; d, dm: [N, G]."""
    num = xs if dm is None else xs + dm[..., None]
    lnew = nearest_int(num / d[..., None]).clamp_(lo, hi)
    return torch.where((d != 0)[..., None], lnew, L)


# ---------------------------------------------------------------------------- quantizers


def _subblocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N, 256] -> element-major [n, N*256/n]."""
    return x.reshape(-1, n).t().contiguous()


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_ref: [N, 256] float32 -> uint8 [N, 84] (scales[16], qs[64], d, dmin)."""
    N = x.shape[0]
    xT = _subblocks(x, 16)
    L, scales, mins = make_qkx2_quants(xT, xT.abs(), 3, _f32(-0.5), _f32(0.1), 15, True)
    L = L.t().reshape(N, 16, 16)
    scales = scales.reshape(N, 16)
    mins = mins.reshape(N, 16)
    max_scale = _pos_max(scales, 1)
    max_min = _pos_max(mins, 1)
    has_s = (max_scale > 0)[:, None]
    has_m = (max_min > 0)[:, None]
    ls = nearest_int(_rdiv(15.0, max_scale)[:, None] * scales) & 0xFF
    lm = nearest_int(_rdiv(15.0, max_min)[:, None] * mins)
    sc = torch.where(has_s, ls, 0)
    sc = torch.where(has_m, sc | ((lm << 4) & 0xFF), sc)
    d16 = torch.where(max_scale > 0, max_scale / 15.0, torch.zeros_like(max_scale))
    m16 = torch.where(max_min > 0, max_min / 15.0, torch.zeros_like(max_min))
    d = _fp16_round(d16)[:, None] * (sc & 0xF).float()
    dm = _fp16_round(m16)[:, None] * (sc >> 4).float()
    L = _requant(x.reshape(N, 16, 16), d, dm, 0, 3, L.to(torch.int32))
    out = torch.empty(N, 84, dtype=torch.uint8)
    out[:, 0:16] = sc.to(torch.uint8)
    out[:, 16:80] = _pack_2bit(L.reshape(N, 256).to(torch.uint8))
    out[:, 80:82] = _fp16_bytes(d16)
    out[:, 82:84] = _fp16_bytes(m16)
    return out


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_ref: [N, 256] float32 -> uint8 [N, 110] (hmask[32], qs[64], scales[12], d)."""
    N = x.shape[0]
    L, scales = make_q3_quants_rmse(x.reshape(-1, 16), 4)
    L = L.t().reshape(N, 16, 16).to(torch.int32)
    scales = scales.reshape(N, 16)
    amax, max_scale = _first_absmax(scales)
    has = max_scale != 0
    iscale = _rdiv(-32.0, max_scale)
    ls = nearest_int(iscale[:, None] * scales)
    ls = ((ls + 128) & 0xFF) - 128  # int8_t
    ls = ls.clamp_(-32, 31) + 32
    ls = torch.where(has[:, None], ls, 0)  # 6-bit scales 0..63
    d16 = torch.where(has, _rdiv(1.0, iscale), torch.zeros_like(iscale))
    d = _fp16_round(d16)[:, None] * (ls - 32).float()
    L = _requant(x.reshape(N, 16, 16), d, None, -4, 3, L - 4) + 4
    L = L.reshape(N, 256)
    # hmask: element j's bit 2 goes to hmask[j % 32], bit j / 32
    high = L > 3
    hmask = _bitplanes(high.to(torch.uint8).reshape(N, 8, 32))
    L = torch.where(high, L - 4, L)
    out = torch.empty(N, 110, dtype=torch.uint8)
    out[:, 0:32] = hmask
    out[:, 32:96] = _pack_2bit(L.to(torch.uint8))
    lu = ls.to(torch.uint8)
    sc = torch.empty(N, 12, dtype=torch.uint8)
    sc[:, 0:8] = (lu[:, 0:8] & 0xF) | ((lu[:, 8:16] & 0xF) << 4)
    hi = (lu >> 4).reshape(N, 4, 4)  # [N, j/4, j%4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    out[:, 96:108] = sc
    out[:, 108:110] = _fp16_bytes(d16)
    return out


def _quantize_q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The shared part of quantize_row_q4_K_ref / q5_K_ref: (L int32 [N, 256], scales uint8 [N, 12], d16, dmin16)."""
    N = x.shape[0]
    xT = _subblocks(x, 32)
    sum_x2 = _seqsum(xT * xT)
    av_x = _sqrtf(sum_x2 / 32.0)
    wT = av_x + xT.abs()
    L, scales, mins = make_qkx2_quants(xT, wT, nmax, rmin, _f32(0.1), nstep, False)
    L = L.t().reshape(N, 8, 32).to(torch.int32)
    scales = scales.reshape(N, 8)
    mins = mins.reshape(N, 8)
    max_scale = _pos_max(scales, 1)
    max_min = _pos_max(mins, 1)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)  # uint8_t, then MIN(63, .)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    d16 = max_scale / 63.0
    m16 = max_min / 63.0
    d = _fp16_round(d16)[:, None] * ls.float()
    dm = _fp16_round(m16)[:, None] * lm.float()
    L = _requant(x.reshape(N, 8, 32), d, dm, 0, nmax, L).reshape(N, 256)
    return L, _pack_scales_k4(ls.to(torch.uint8), lm.to(torch.uint8)), d16, m16


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_K_ref: [N, 256] float32 -> uint8 [N, 144] (d, dmin, scales[12], qs[128])."""
    N = x.shape[0]
    L, sc, d16, m16 = _quantize_q45_k(x, 15, -1.0, 20)
    q = L.to(torch.uint8).reshape(N, 4, 2, 32)
    out = torch.empty(N, 144, dtype=torch.uint8)
    out[:, 0:2] = _fp16_bytes(d16)
    out[:, 2:4] = _fp16_bytes(m16)
    out[:, 4:16] = sc
    out[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, 128)
    return out


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_K_ref: [N, 256] float32 -> uint8 [N, 176] (d, dmin, scales[12], qh[32], qs[128])."""
    N = x.shape[0]
    L, sc, d16, m16 = _quantize_q45_k(x, 31, -0.5, 15)
    q = L.to(torch.uint8).reshape(N, 8, 32)  # sub-block j = 2*(n/64) + half
    qh = _bitplanes(q >> 4)
    lo = (q & 0xF).reshape(N, 4, 2, 32)
    out = torch.empty(N, 176, dtype=torch.uint8)
    out[:, 0:2] = _fp16_bytes(d16)
    out[:, 2:4] = _fp16_bytes(m16)
    out[:, 4:16] = sc
    out[:, 16:48] = qh
    out[:, 48:176] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(N, 128)
    return out


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_row_q6_K_ref: [N, 256] float32 -> uint8 [N, 210] (ql[128], qh[64], scales[16] int8, d).
    With `qw` (the importance of each value, [N, 256]): quantize_row_q6_K_impl, which only passes it
    to the sub-block search as its weights."""
    N = x.shape[0]
    L, scales = make_qx_quants_rmse1(x.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
    L = L.t().reshape(N, 16, 16).to(torch.int32)
    scales = scales.reshape(N, 16)
    amax, max_scale = _first_absmax(scales)
    empty = amax < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, max_scale)
    d16 = _rdiv(1.0, iscale)
    sc = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    sc = ((sc + 128) & 0xFF) - 128  # int8_t
    d = _fp16_round(d16)[:, None] * sc.float()
    L = _requant(x.reshape(N, 16, 16), d, None, -32, 31, L - 32) + 32
    q = L.to(torch.uint8).reshape(N, 2, 4, 32)  # [N, half, quarter, l]
    ql = torch.empty(N, 2, 2, 32, dtype=torch.uint8)
    ql[:, :, 0] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    h = q >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    out = torch.empty(N, 210, dtype=torch.uint8)
    out[:, 0:128] = ql.reshape(N, 128)
    out[:, 128:192] = qh.reshape(N, 64)
    out[:, 192:208] = sc.to(torch.int8).view(torch.uint8)
    out[:, 208:210] = _fp16_bytes(d16)
    out[empty] = 0
    return out


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K_ref: [N, 256] float32 -> uint8 [N, 292] (float d, qs[256] int8, bsums[16] int16).
    An all-zero block is all zero bytes (C leaves its bsums unset)."""
    N = x.shape[0]
    amax, mx = _first_absmax(x)
    empty = amax == 0
    iscale = _rdiv(-127.0, mx)
    qs = nearest_int(iscale[:, None] * x).clamp_(max=127)
    qs = ((qs + 128) & 0xFF) - 128  # int8_t
    qs = torch.where(empty[:, None], 0, qs)
    bsums = qs.reshape(N, 16, 16).sum(-1)
    d = torch.where(empty, torch.zeros_like(iscale), _rdiv(1.0, iscale))
    out = torch.empty(N, 292, dtype=torch.uint8)
    out[:, 0:4] = d.contiguous().view(torch.uint8).reshape(N, 4)
    out[:, 4:260] = qs.to(torch.int8).view(torch.uint8)
    out[:, 260:292] = bsums.to(torch.int16).contiguous().view(torch.uint8).reshape(N, 32)
    return out
