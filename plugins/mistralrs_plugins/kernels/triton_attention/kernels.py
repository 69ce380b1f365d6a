"""Triton attention over the paged KV cache: the ops `mistralrs.nn.torch_ops.paged_attention_decode` and
`paged_attention_prefill`.

Decode: two kernels, split-K (flash-decoding):

1. ``_decode_split``, grid (sequences, KV heads, splits): split ``j`` of sequence ``i`` walks the key
   positions ``[j * chunk, (j + 1) * chunk)`` that are visible (below ``seq_lens[i]``, and inside the
   sliding window), ``BLOCK_N`` at a time: each position's slot comes from the block table, K and V rows
   are read in place (no gather copy), the KV head's group of query heads is scored together (GQA:
   ``tl.dot`` of ``[group, D] x [D, BLOCK_N]``, the group padded to 16 rows), softcapped, and folded into
   an online softmax. All of it in fp32 (full-precision dots: decode reads each K/V byte once, so it is
   bound by memory, not by the multiplies; and bf16 dots are not exact in the interpreter). It writes its normalized partial output and log-sum-exp.
2. ``_decode_reduce``, grid (sequences, query heads): the splits' outputs weighted by ``exp(lse - max)``;
   attention sinks (GPT-OSS) are one more term of the denominator here, with no value.

The number of splits comes from the block table's width (``W * block_size`` positions, no device sync):
one split per `SPLIT_TOKENS` positions, at most `MAX_SPLITS`. Autograd and devices the kernel cannot run
on go to the reference.

fp8 KV caches (``float8_e4m3fn``, `--pa-cache-type f8e4m3`: plain casts, no scales) are read as bytes and
widened in registers (`triton_fp8.e4m3_to_f32`, exact) by both attention kernels; ``kv_cache_write``
(``_write_fp8``) converts each new K/V row as torch's cast does and stores it in its slot in one launch.

Prefill: ``_prefill``, grid (tiles, query heads), flash attention over the paged cache. A tile is up to
``PREFILL_BLOCK_M`` consecutive new tokens of one sequence (the tile list is built on the host from
``query_start_loc`` and ``seq_lens``, which the backend has as Python ints, and kept for the step's other
layers); it walks the keys from the first one its window lets any of its rows see to its last row's
position (causal: cached context, then the chunk itself), ``PREFILL_BLOCK_N`` at a time, slots from the block
table, K/V read in place, with per-row causal and sliding-window masks, softcap, an online softmax and
attention sinks folded in at the end. Scores are ``tl.dot`` of q and K in their own dtype with fp32
accumulation (bf16/fp16 products are exact in fp32, so this is the fp32 reference's arithmetic up to the
summation order); P is rounded to V's dtype for the second dot as flash attention does (fp32 inputs stay
fp32 throughout). The interpreter's bf16 ``tl.dot`` is wrong (it multiplies the raw bits), so under
``TRITON_INTERPRET=1`` every dot is fp32; the tensor-core path is checked on a GPU by tests/cuda.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels.triton_fp8 import e4m3_to_f32, f32_to_e4m3
from mistralrs_plugins.kernels.triton_support import interpreter_mode, runs_here

PREFILL_BLOCK_M = 32
PREFILL_BLOCK_N = 32
BLOCK_N = 32
SPLIT_TOKENS = 512
MAX_SPLITS = 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn  # the engine's fp8 KV cache (`--pa-cache-type f8e4m3`): plain casts, no scales


def _cache_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Caches in q's dtype, or both fp8 E4M3."""
    return (k_cache.dtype == v_cache.dtype == q.dtype) or (k_cache.dtype == v_cache.dtype == FP8)


def _as_read(cache: torch.Tensor) -> torch.Tensor:
    """What the kernels load: an fp8 cache as its bytes (decoded in the kernel), others as they are."""
    return cache.view(torch.uint8) if cache.dtype == FP8 else cache


@triton.jit
def _load_kv(ptrs, mask, FP8_KV: tl.constexpr):
    """K or V rows: as stored, or E4M3 bytes (an fp8 cache viewed as uint8) widened to fp32 exactly."""
    if FP8_KV:
        return e4m3_to_f32(tl.load(ptrs, mask=mask, other=0).to(tl.int32))
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _decode_split(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, mid_o, mid_lse,
                  q_ss, q_sh, k_st, k_sh, v_st, v_sh, bt_s,
                  n_qheads, group, head_dim, v_dim, block_size, chunk, n_splits, scale, softcap, window,
                  HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, FP8_KV: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(lens_ptr + s).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)
    start = tl.maximum(lo, sp * chunk)
    end = tl.minimum(length, (sp + 1) * chunk)

    g = tl.arange(0, BLOCK_G)
    gm = g < group
    heads = h * group + g
    d = tl.arange(0, BLOCK_D)
    dm = d < head_dim
    dv = tl.arange(0, BLOCK_DV)
    dvm = dv < v_dim
    q = tl.load(q_ptr + s * q_ss + heads[:, None] * q_sh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        p = n0 + tl.arange(0, BLOCK_N)
        pm = p < end
        blk = tl.load(bt_ptr + s * bt_s + p // block_size, mask=pm, other=0).to(tl.int64)
        slot = blk * block_size + p % block_size
        k = _load_kv(k_ptr + slot[:, None] * k_st + h * k_sh + d[None, :], pm[:, None] & dm[None, :], FP8_KV)
        sc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        if HAS_SOFTCAP:  # c * tanh(s / c), tanh(z) = 2 sigmoid(2z) - 1
            sc = softcap * (2.0 * tl.sigmoid(2.0 * sc / softcap) - 1.0)
        sc = tl.where(pm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = _load_kv(v_ptr + slot[:, None] * v_st + h * v_sh + dv[None, :], pm[:, None] & dvm[None, :], FP8_KV)
        acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        m_i = m_new

    valid = l_i > 0.0
    l_safe = tl.where(valid, l_i, 1.0)
    lse = tl.where(valid, m_i + tl.log(l_safe), float("-inf"))
    row = (s * n_qheads + heads) * n_splits + sp
    tl.store(mid_lse + row, lse, mask=gm)
    tl.store(mid_o + row[:, None] * v_dim + dv[None, :], acc / l_safe[:, None], mask=gm[:, None] & dvm[None, :])


@triton.jit
def _decode_reduce(mid_o, mid_lse, sinks_ptr, out_ptr, o_ss, o_sh, n_qheads, v_dim, n_splits,
                   HAS_SINKS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    j = tl.arange(0, BLOCK_SPLITS)
    jm = j < n_splits
    dv = tl.arange(0, BLOCK_DV)
    dvm = dv < v_dim
    row = (s * n_qheads + hq) * n_splits + j
    lse = tl.load(mid_lse + row, mask=jm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    if HAS_SINKS:  # the sink's logit joins the denominator only (no value): one more term of the sum
        sink = tl.load(sinks_ptr + hq).to(tl.float32)
        mx = tl.maximum(mx, sink)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx)
    total = tl.sum(w, axis=0)
    if HAS_SINKS:
        total += tl.exp(sink - mx)
    w = w / tl.where(total > 0.0, total, 1.0)
    o = tl.load(mid_o + row[:, None] * v_dim + dv[None, :], mask=jm[:, None] & dvm[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0)
    tl.store(out_ptr + s * o_ss + hq * o_sh + dv, out.to(out_ptr.dtype.element_ty), mask=dvm)


def num_splits(max_positions: int) -> int:
    return max(1, min(MAX_SPLITS, triton.cdiv(max_positions, SPLIT_TOKENS)))


def _takes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor) -> bool:
    return (runs_here(q, k_cache, v_cache, block_tables, seq_lens)
            and q.dim() == 3 and k_cache.dim() == 3 and v_cache.dim() == 3
            and q.dtype in DTYPES and _cache_ok(q, k_cache, v_cache)
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and k_cache.shape[1] == v_cache.shape[1] and q.shape[1] % k_cache.shape[1] == 0
            and q.shape[2] == k_cache.shape[2] and block_tables.dim() == 2
            and block_tables.shape[0] == q.shape[0] == seq_lens.shape[0])


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None, *, splits: int | None = None) -> torch.Tensor:
    """The reference's signature; ``splits`` forces the number of context splits (tests). Attention sinks
    (GPT-OSS, one logit per query head) are added to the denominator where the splits are combined."""
    if (not _takes(q, k_cache, v_cache, block_tables, seq_lens) or not runs_here(sinks)
            or (sinks is not None and sinks.numel() != q.shape[1])):
        return torch_ops.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale,
                                                sliding_window, softcap, sinks)
    S, hq, D = q.shape
    hk, dv = k_cache.shape[1], v_cache.shape[2]
    out = torch.empty((S, hq, dv), dtype=q.dtype, device=q.device)
    if S == 0 or block_tables.shape[1] == 0:
        return out.zero_()
    group = hq // hk
    n_splits = splits or num_splits(block_tables.shape[1] * block_size)
    chunk = BLOCK_N * triton.cdiv(triton.cdiv(block_tables.shape[1] * block_size, n_splits), BLOCK_N)
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    lens = seq_lens.to(device=q.device)
    mid_o = torch.empty((S, hq, n_splits, dv), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((S, hq, n_splits), dtype=torch.float32, device=q.device)
    _decode_split[(S, hk, n_splits)](
        q, _as_read(k_cache), _as_read(v_cache), tables, lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        tables.stride(0), hq, group, D, dv, block_size, chunk, n_splits, float(scale),
        float(softcap) if softcap else 1.0, int(sliding_window) if sliding_window else 0,
        HAS_SOFTCAP=bool(softcap), HAS_WINDOW=bool(sliding_window), FP8_KV=k_cache.dtype == FP8,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
    )
    sk = sinks.to(device=q.device, dtype=torch.float32).contiguous() if sinks is not None else mid_lse
    _decode_reduce[(S, hq)](
        mid_o, mid_lse, sk, out, out.stride(0), out.stride(1), hq, dv, n_splits, HAS_SINKS=sinks is not None,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(n_splits)), BLOCK_DV=triton.next_power_of_2(dv),
    )
    return out


@triton.jit
def _prefill(q_ptr, k_ptr, v_ptr, bt_ptr, tiles_ptr, sinks_ptr, out_ptr,
             q_st, q_sh, k_st, k_sh, v_st, v_sh, bt_s, o_st, o_sh,
             group, head_dim, v_dim, block_size, scale, softcap, window,
             HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, FP32: tl.constexpr,
             FP8_KV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // group
    seq = tl.load(tiles_ptr + t * 4).to(tl.int64)
    row0 = tl.load(tiles_ptr + t * 4 + 1).to(tl.int64)
    rows = tl.load(tiles_ptr + t * 4 + 2)
    pos0 = tl.load(tiles_ptr + t * 4 + 3)
    r = tl.arange(0, BLOCK_M)
    rm = r < rows
    qpos = pos0 + r
    hi = pos0 + rows  # keys [lo, hi): causal up to the tile's last row
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos0 - window + 1, 0)
    d = tl.arange(0, BLOCK_D)
    dm = d < head_dim
    dv = tl.arange(0, BLOCK_DV)
    dvm = dv < v_dim
    q = tl.load(q_ptr + (row0 + r)[:, None] * q_st + hq * q_sh + d[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        p = n0 + tl.arange(0, BLOCK_N)
        pm = p < hi
        blk = tl.load(bt_ptr + seq * bt_s + p // block_size, mask=pm, other=0).to(tl.int64)
        slot = blk * block_size + p % block_size
        k = _load_kv(k_ptr + slot[:, None] * k_st + h * k_sh + d[None, :], pm[:, None] & dm[None, :], FP8_KV)
        if FP8_KV:  # E4M3 values are exact in q's dtype (bf16, fp16 or fp32)
            k = k.to(q.dtype)
        if FP32:
            sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = sc * scale
        if HAS_SOFTCAP:  # c * tanh(s / c), tanh(z) = 2 sigmoid(2z) - 1
            sc = softcap * (2.0 * tl.sigmoid(2.0 * sc / softcap) - 1.0)
        allowed = (p[None, :] <= qpos[:, None]) & pm[None, :]
        if HAS_WINDOW:
            allowed &= p[None, :] > qpos[:, None] - window
        sc = tl.where(allowed, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see none of these keys yet
        alpha = tl.exp(m_i - m_safe)
        pr = tl.exp(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = _load_kv(v_ptr + slot[:, None] * v_st + h * v_sh + dv[None, :], pm[:, None] & dvm[None, :], FP8_KV)
        if FP8_KV:
            v = v.to(q.dtype)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(pr, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    if HAS_SINKS:  # the sink's logit joins the denominator only
        sink = tl.load(sinks_ptr + hq).to(tl.float32)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.exp(sink - m_new)
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (row0 + r)[:, None] * o_st + hq * o_sh + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & dvm[None, :])


_tiles_cache: dict[tuple, torch.Tensor] = {}


def prefill_tiles(starts: list[int], lens: list[int], device: torch.device) -> torch.Tensor:
    """int32 [tiles, 4]: (sequence, first flat row, rows, position of the first row) per tile of new tokens.
    The last few are kept: every layer of a step asks for the same tiles."""
    key = (tuple(starts), tuple(lens), str(device))
    found = _tiles_cache.get(key)
    if found is None:
        rows = []
        for i, sl in enumerate(lens):
            qs, n = starts[i], starts[i + 1] - starts[i]
            rows += [(i, qs + r0, min(PREFILL_BLOCK_M, n - r0), sl - n + r0) for r0 in range(0, n, PREFILL_BLOCK_M)]
        found = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device)
        if len(_tiles_cache) >= 8:
            _tiles_cache.pop(next(iter(_tiles_cache)))
        _tiles_cache[key] = found
    return found


def _ints(values) -> list[int]:  # type: ignore[no-untyped-def]
    return values.tolist() if isinstance(values, torch.Tensor) else [int(v) for v in values]


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens, query_start_loc, block_size: int,  # type: ignore[no-untyped-def]
                            scale: float, sliding_window: int | None = None, softcap: float | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's signature (`torch_ops.paged_attention_prefill`)."""
    starts, lens = _ints(query_start_loc), _ints(seq_lens)
    if (not runs_here(q, k_cache, v_cache, block_tables, sinks) or q.dim() != 3 or k_cache.dim() != 3
            or v_cache.dim() != 3 or q.dtype not in DTYPES or not _cache_ok(q, k_cache, v_cache)
            or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1
            or k_cache.shape[1] != v_cache.shape[1] or q.shape[1] % k_cache.shape[1]
            or q.shape[2] != k_cache.shape[2] or block_tables.dim() != 2
            or not (len(starts) == len(lens) + 1 == block_tables.shape[0] + 1)
            or (sinks is not None and sinks.numel() != q.shape[1])):
        return torch_ops.paged_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                 block_size, scale, sliding_window, softcap, sinks)
    T, hq, D = q.shape
    hk, dv = k_cache.shape[1], v_cache.shape[2]
    out = torch.empty((T, hq, dv), dtype=q.dtype, device=q.device)
    tiles = prefill_tiles(starts, lens, q.device)
    if tiles.shape[0] == 0:
        return out
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    sk = sinks.to(device=q.device, dtype=torch.float32).contiguous() if sinks is not None else out
    _prefill[(tiles.shape[0], hq)](
        q, _as_read(k_cache), _as_read(v_cache), tables, tiles, sk, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        tables.stride(0), out.stride(0), out.stride(1), hq // hk, D, dv, block_size, float(scale),
        float(softcap) if softcap else 1.0, int(sliding_window) if sliding_window else 0,
        HAS_SOFTCAP=bool(softcap), HAS_WINDOW=bool(sliding_window), HAS_SINKS=sinks is not None,
        FP32=q.dtype == torch.float32 or interpreter_mode(), FP8_KV=k_cache.dtype == FP8, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
    )
    return out


@triton.jit
def _write_fp8(x_ptr, slots_ptr, c_ptr, x_st, x_sh, c_st, c_sh, n_heads, head_dim,
               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (hh < n_heads)[:, None] & (d < head_dim)[None, :]
    slot = tl.load(slots_ptr + t).to(tl.int64)
    x = tl.load(x_ptr + t * x_st + hh[:, None] * x_sh + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(c_ptr + slot * c_st + hh[:, None] * c_sh + d[None, :], f32_to_e4m3(x).to(tl.uint8), mask=m)


def kv_cache_write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """The reference's signature (`torch_ops.kv_cache_write`). An fp8 E4M3 cache in one launch: each new
    row converted as torch's cast does (`triton_fp8.f32_to_e4m3`) and stored in its slot, where the reference
    makes a converted copy and then scatters it. Other caches (a plain scatter) go to the reference."""
    if (cache.dtype != FP8 or not runs_here(cache, slots, x) or x.dtype not in DTYPES or x.dim() != 3
            or cache.dim() != 3 or x.shape[1:] != cache.shape[1:] or slots.dim() != 1
            or slots.shape[0] != x.shape[0] or x.stride(-1) != 1 or cache.stride(-1) != 1):
        torch_ops.kv_cache_write(cache, slots, x)
        return
    T, H, D = x.shape
    if T == 0:
        return
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // triton.next_power_of_2(D)))
    _write_fp8[(T, triton.cdiv(H, block_h))](
        x, slots, cache.view(torch.uint8), x.stride(0), x.stride(1), cache.stride(0), cache.stride(1), H, D,
        BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(D),
    )
