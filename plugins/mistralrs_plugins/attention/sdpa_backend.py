"""Implementation of the reference SDPA backend (see sdpa.py for the registration)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralrs.attention import AttentionBackend, AttentionBatch, KVCacheShape


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    paged = False

    def __init__(self, shape: KVCacheShape) -> None:
        super().__init__(shape)
        s = shape
        slots = s.num_blocks * s.block_size
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        if slots:
            for _ in range(s.num_layers):
                self.k_cache.append(torch.zeros(slots, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=s.device))
                self.v_cache.append(
                    torch.zeros(slots, s.num_kv_heads, s.v_head_dim or s.head_dim, dtype=s.dtype, device=s.device)
                )

    def prepare(self, batch: AttentionBatch) -> None:
        if batch.block_tables is None:
            if any(batch.context_lens):
                raise ValueError("a batch without a KV cache cannot have cached context")
            return
        bs = self.block_size
        slots = []
        for i, sl in enumerate(batch.seq_lens):
            pos = torch.arange(sl, device=batch.block_tables.device)
            slots.append(batch.block_tables[i, pos // bs].long() * bs + pos % bs)
        batch.scratch["sdpa_slots"] = slots

    def attend(self, layer, q, k, v, batch, *, scale, sliding_window=None, softcap=None):
        cached = batch.slot_mapping is not None and bool(self.k_cache)
        if cached:
            kc, vc = self.k_cache[layer], self.v_cache[layer]
            write_slots(kc, batch.slot_mapping, k)
            write_slots(vc, batch.slot_mapping, v)
        hq, hk = q.shape[1], k.shape[1]
        out = q.new_empty(q.shape[0], hq, v.shape[-1])
        qsl = batch.query_start_loc
        for i, sl in enumerate(batch.seq_lens):
            qs, qe = qsl[i], qsl[i + 1]
            ql = qe - qs
            if ql == 0:
                continue
            if cached:
                slots = batch.scratch["sdpa_slots"][i]
                ks, vs = read_slots(kc, slots, q.dtype), read_slots(vc, slots, q.dtype)
            else:
                ks, vs = k[qs:qe], v[qs:qe]
            ctx = sl - ql
            qpos = torch.arange(ctx, sl, device=q.device)[:, None]
            kpos = torch.arange(sl, device=q.device)[None, :]
            allowed = kpos <= qpos
            if sliding_window is not None:
                allowed &= kpos > qpos - sliding_window
            qi = q[qs:qe].transpose(0, 1)  # [Hq, ql, D]
            ki = ks.transpose(0, 1).repeat_interleave(hq // hk, dim=0)
            vi = vs.transpose(0, 1).repeat_interleave(hq // hk, dim=0)
            if softcap is None:
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, scale=scale)
            else:
                scores = (qi @ ki.transpose(-1, -2)).float() * scale
                scores = softcap * torch.tanh(scores / softcap)
                scores = scores.masked_fill(~allowed, float("-inf"))
                oi = torch.softmax(scores, dim=-1).to(vi.dtype) @ vi
            out[qs:qe] = oi.transpose(0, 1)
        return out

    def copy_blocks(self, pairs):
        bs = self.block_size
        for src, dst in pairs:
            for cache in (*self.k_cache, *self.v_cache):
                cache[dst * bs:(dst + 1) * bs] = cache[src * bs:(src + 1) * bs]


_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slots] = x, converting to the cache dtype (fp8 caches go through a byte view,
    since torch has no fp8 index_copy on CPU)."""
    if cache.dtype in _FP8:
        cache.view(torch.uint8).index_copy_(0, slots, x.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, slots, x.to(cache.dtype))


def read_slots(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if cache.dtype in _FP8:
        return cache.view(torch.uint8)[slots].view(cache.dtype).to(dtype)
    return cache[slots].to(dtype)
