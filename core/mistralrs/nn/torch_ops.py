"""Torch reference ops: plain, readable, and what every faster kernel is compared against.

Part of the kernel contract, so they live in the core: the `kernels_torch` plugin registers
them, and `nn.kernels.lookup_kernel` falls back to them when no kernel plugin is loaded."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add_unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm computed in float32 (as HF does), cast back to x's dtype.
    `add_unit_offset` is Gemma's ``x * (1 + w)`` variant."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float()
    if add_unit_offset:
        w = w + 1.0
    return (xf * w).to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       add_unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step: ``h = x + residual`` (in x's dtype, rounded once), then
    ``(rms_norm(h, weight, eps, add_unit_offset), h)``."""
    h = x + residual
    return rms_norm(h, weight, eps, add_unit_offset), h


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
           interleaved: bool = False) -> torch.Tensor:
    """Apply rotary embeddings to x[T, H, D] with cos/sin[T, rotary_dim/2]; dims beyond
    `rotary_dim` pass through (partial rotary). `interleaved` rotates pairs (GPT-J style)
    instead of halves (NeoX style)."""
    d = rotary_dim or x.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    cos = cos[:, None, :].to(torch.float32)
    sin = sin[:, None, :].to(torch.float32)
    rf = rot.float()
    if interleaved:
        x1, x2 = rf[..., 0::2], rf[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        x1, x2 = rf[..., : d // 2], rf[..., d // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = out.to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU: gelu(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
    """y = x @ weight.T (+ bias), as float32 with `out_f32` (LM-head logits): the reference for the
    bf16 decode GEMV kernels."""
    y = F.linear(x, weight, bias)
    return y.float() if out_f32 else y


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over a paged KV cache: sequence i's one query token (at position
    ``seq_lens[i] - 1``) attends to its first ``seq_lens[i]`` keys, found through its block table
    (position p lives in slot ``block_tables[i, p // block_size] * block_size + p % block_size``).

    q [S, Hq, D]; k_cache [slots, Hk, D] and v_cache [slots, Hk, Dv] (fp8 caches are upcast);
    block_tables [S, W]; seq_lens [S] -> out [S, Hq, Dv] in q's dtype. Grouped-query: query head j
    reads KV head j // (Hq / Hk). `sliding_window` W: only keys at positions > p - W. `softcap` c:
    scores -> c * tanh(scores / c). `sinks` [Hq]: a per-head logit joining each softmax's
    denominator with no value (`attention_with_sinks`).
    """
    from mistralrs.attention import read_slots

    S, hq, _ = q.shape
    hk = k_cache.shape[1]
    dev = q.device
    lens = seq_lens.to(device=dev, dtype=torch.long)
    width = int(lens.max()) if S else 0
    pos = torch.arange(width, device=dev)
    tables = block_tables.to(device=dev, dtype=torch.long)
    blk = tables.gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1).expand(S, -1))
    visible = pos[None, :] < lens[:, None]
    if sliding_window:
        visible &= pos[None, :] > (lens - 1)[:, None] - sliding_window
    slots = (blk * block_size + pos % block_size).masked_fill(~visible, 0).reshape(-1)
    keys = read_slots(k_cache, slots, q.dtype).view(S, width, hk, -1).transpose(1, 2)  # [S, Hk, L, D]
    vals = read_slots(v_cache, slots, q.dtype).view(S, width, hk, -1).transpose(1, 2)
    # Each KV head's group of query heads on the "query length" axis ([S, Hk, group, D]): a real
    # GQA matmul instead of repeating K/V per query head (~7x faster on CPU).
    qs = q.reshape(S, hk, hq // hk, -1)
    mask = visible[:, None, None, :]
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=None if bool(visible.all()) else mask,
                                             scale=scale)
    else:
        scores = (qs.float() @ keys.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = (softmax_with_sinks(scores, None if sinks is None else sinks.view(hk, hq // hk, 1))
               @ vals.float()).to(q.dtype)
    return out.reshape(S, hq, -1)


def kv_cache_write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """``cache[slots] = x`` in the cache's dtype: x [T, H, D] (new keys or values), slots [T] (int64) of a
    cache [slots, H, D]. An fp8 (``float8_e4m3fn``) cache gets torch's cast of x (round to nearest even,
    saturating at +-448, no scales), through a byte view: `mistralrs.attention.write_slots`."""
    from mistralrs.attention import write_slots

    write_slots(cache, slots, x)


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """The experts of a top-k mixture with stacked plain weights: ``out[t] = sum_j w_j * down_e(silu(gate_e(x_t))
    * up_e(x_t))`` over token t's experts ``e = topk_ids[t, j]`` with weights ``w_j = topk_weights[t, j]``.

    x [T, H]; topk_weights [T, k] (float32, or x's dtype: the product ``h * w`` follows torch's promotion);
    topk_ids [T, k]; w13 [E, 2I, H] (each expert's gate rows, then its up rows); w2 [E, H, I] -> [T, H] in x's
    dtype. The arithmetic of `SparseMoE`'s loop over experts: each expert's matmuls on its tokens rounded to x's
    dtype, ``silu_and_mul``, scaled by the routing weight, added into the output in expert order.
    """
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        token_idx, k_pos = torch.where(topk_ids == e)
        h = F.linear(silu_and_mul(F.linear(x[token_idx], w13[e])), w2[e])
        h = h * topk_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


# fp32 scores per block of query rows in paged_attention_prefill, at most this many (32 MB)
_PREFILL_SCORE_ELEMENTS = 1 << 23


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: Any, query_start_loc: Any, block_size: int,
                            scale: float, sliding_window: int | None = None, softcap: float | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill (chunked) attention over a paged KV cache whose new K/V are already written: sequence i's
    new tokens ``q[query_start_loc[i]:query_start_loc[i + 1]]``, at positions ``seq_lens[i] - n ..
    seq_lens[i] - 1`` (n of them; the rest of its first ``seq_lens[i]`` positions is cached context),
    each attend causally to the sequence's keys up to their own position, read through its block table.

    q [T, Hq, D]; k_cache [slots, Hk, D], v_cache [slots, Hk, Dv] (fp8 caches are upcast); block_tables
    [S, W]; seq_lens [S] and query_start_loc [S + 1] (ints, lists or tensors) -> out [T, Hq, Dv] in q's
    dtype. Grouped-query, `sliding_window`, `softcap` and `sinks` as in `paged_attention_decode`. fp32
    arithmetic (the sdpa backend's prefill numerics), query rows in blocks that bound the scores' memory.
    """
    from mistralrs.attention import read_slots

    starts = [int(s) for s in query_start_loc]
    lens = [int(n) for n in seq_lens]
    hq, d = q.shape[1], q.shape[2]
    hk, dv = k_cache.shape[1], v_cache.shape[-1]
    g = hq // hk
    dev = q.device
    tables = block_tables.to(device=dev, dtype=torch.long)
    out = q.new_empty(q.shape[0], hq, dv)
    for i, sl in enumerate(lens):
        qs, qe = starts[i], starts[i + 1]
        n = qe - qs
        if n == 0:
            continue
        pos = torch.arange(sl, device=dev)
        slots = tables[i, pos // block_size] * block_size + pos % block_size
        keys = read_slots(k_cache, slots, torch.float32).transpose(0, 1)  # [Hk, L, D]
        vals = read_slots(v_cache, slots, torch.float32).transpose(0, 1)
        rows = max(1, _PREFILL_SCORE_ELEMENTS // max(1, hq * sl))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            m = sl - n + r1  # the keys any of these rows can see
            qpos = torch.arange(sl - n + r0, sl - n + r1, device=dev)[:, None]
            allowed = pos[None, :m] <= qpos
            if sliding_window:
                allowed &= pos[None, :m] > qpos - sliding_window
            qb = q[qs + r0:qs + r1].to(torch.float32).transpose(0, 1).reshape(hk, g * (r1 - r0), d)
            scores = torch.bmm(qb, keys[:, :m].transpose(1, 2)).view(hk, g, r1 - r0, m) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~allowed, float("-inf"))
            p = softmax_with_sinks(scores, None if sinks is None else sinks.to(torch.float32).view(hk, g, 1, 1))
            o = torch.bmm(p.view(hk, g * (r1 - r0), m), vals[:, :m]).view(hq, r1 - r0, dv)
            out[qs + r0:qs + r1] = o.transpose(0, 1).to(q.dtype)
    return out


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of float `scores` [..., H, Q, L]; with `sinks` (broadcastable to
    [..., H, Q, 1]) each row's denominator also holds exp(sink), whose probability is dropped
    (GPT-OSS's attention sinks)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.float().expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
