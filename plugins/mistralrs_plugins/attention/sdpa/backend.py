"""Implementation of the reference SDPA backend (registered in `__init__.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralrs.attention import AttentionBackend, AttentionBatch, KVCacheShape, read_slots
from mistralrs.nn.torch_ops import softmax_with_sinks


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    paged = False

    def __init__(self, shape: KVCacheShape) -> None:
        super().__init__(shape)
        from mistralrs.nn.kernels import lookup_kernel

        s = shape
        self.write = lookup_kernel("kv_cache_write", s.device)  # Triton on cuda for fp8 caches (one fused cast)
        slots = s.num_blocks * s.block_size
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        if slots:
            for _ in range(s.num_layers):
                k = torch.zeros(slots, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=s.device)
                self.k_cache.append(k)
                if s.v_from_k:  # MLA: the value is the key's leading dims (no storage of its own)
                    self.v_cache.append(k[..., :s.v_head_dim or s.head_dim])
                else:
                    self.v_cache.append(
                        torch.zeros(slots, s.num_kv_heads, s.v_head_dim or s.head_dim, dtype=s.dtype, device=s.device)
                    )

    def prepare(self, batch: AttentionBatch) -> None:
        if batch.block_tables is None and any(batch.context_lens):
            raise ValueError("a batch without a KV cache cannot have cached context")
        if not batch.causal and batch.slot_mapping is not None:
            raise ValueError("a non-causal (encoder) batch runs without a KV cache")

    def seq_slots(self, batch: AttentionBatch, i: int) -> torch.Tensor:
        """The cache slots of sequence i's first seq_lens[i] positions (computed once per step)."""
        slots = batch.scratch.setdefault("sdpa_slots", {})
        if i not in slots:
            bs = self.block_size
            pos = torch.arange(batch.seq_lens[i], device=batch.block_tables.device)
            slots[i] = batch.block_tables[i, pos // bs].long() * bs + pos % bs
        return slots[i]

    def attend(self, layer, q, k, v, batch, *, scale, sliding_window=None, softcap=None, sinks=None):
        cached = self.write_kv(layer, k, v, batch)
        if not cached and softcap is None and sinks is None and batch.num_seqs > 1 and not batch.bidirectional:
            return self.attend_padded(q, k, v, batch, scale=scale, sliding_window=sliding_window)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        for i in range(batch.num_seqs):
            self.attend_seq(i, layer, q, k, v, batch, out, cached=cached, scale=scale,
                            sliding_window=sliding_window, softcap=softcap, sinks=sinks)
        return out

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch) -> bool:
        """Store the step's new K/V in their slots; False when the batch runs without a cache."""
        if batch.slot_mapping is None or not self.k_cache:
            return False
        self.write(self.k_cache[layer], batch.slot_mapping, k)
        if not self.shape.v_from_k:
            self.write(self.v_cache[layer], batch.slot_mapping, v)
        return True

    def attend_seq(self, i, layer, q, k, v, batch, out, *, cached, scale, sliding_window=None, softcap=None,
                   sinks=None):
        """out[sequence i's new tokens] = their causal attention over the sequence's visible keys
        (and, inside the batch's bidirectional ranges, over the whole range)."""
        qsl, sl = batch.query_start_loc, batch.seq_lens[i]
        qs, qe = qsl[i], qsl[i + 1]
        ql = qe - qs
        if ql == 0:
            return
        ctx = sl - ql
        if cached and ctx == 0 and self.k_cache[layer].dtype == k.dtype and self.v_cache[layer].dtype == v.dtype:
            cached = False  # a fresh prompt: its keys are the ones just written, as they are (no gather)
        if cached:  # fp32: the attention below runs in fp32 whatever the model dtype
            slots = self.seq_slots(batch, i)
            ks = read_slots(self.k_cache[layer], slots, torch.float32)
            vs = read_slots(self.v_cache[layer], slots, torch.float32)
        else:
            ks, vs = k[qs:qe], v[qs:qe]
        qpos = torch.arange(ctx, sl, device=q.device)[:, None]
        kpos = torch.arange(sl, device=q.device)[None, :]
        allowed = _allowed(qpos, kpos, batch.causal, sliding_window)
        for lo, hi in batch.seq_bidirectional(i) if batch.bidirectional else ():
            inside = (qpos >= lo) & (qpos < hi) & (kpos >= lo) & (kpos < hi)
            if sliding_window is not None:  # transformers: AND(window, OR(causal, range))
                inside &= kpos > qpos - sliding_window
            allowed = allowed | inside
        # Causal without ranges that reach ahead: query rows < r see at most the first ctx + r keys.
        ahead = not batch.causal or bool(batch.bidirectional and batch.seq_bidirectional(i))
        oi = _blocked_attention(q[qs:qe].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), allowed,
                                (lambda r: sl) if ahead else (lambda r: ctx + r), scale, softcap, sinks)
        out[qs:qe] = oi.transpose(0, 1)

    def attend_padded(self, q, k, v, batch, *, scale, sliding_window=None):
        """Several sequences without a cache (an encoder batch, or --no-kv-cache prefill): padded
        to the longest and attended in one SDPA call instead of one call per sequence."""
        index, valid = _padding(batch, q.device)
        s, length = valid.shape
        hq, hk = q.shape[1], k.shape[1]
        pos = torch.arange(length, device=q.device)
        mask = _allowed(pos[:, None], pos[None, :], batch.causal, sliding_window)[None, None] & valid[:, None, None, :]
        qp = q[index].transpose(1, 2)  # [S, Hq, L, D]
        kp = k[index].transpose(1, 2).repeat_interleave(hq // hk, dim=1)
        vp = v[index].transpose(1, 2).repeat_interleave(hq // hk, dim=1)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
        return o.transpose(1, 2)[valid]  # back to the flat [T, Hq, Dv] order

    def copy_blocks(self, pairs):
        bs = self.block_size
        for src, dst in pairs:
            for cache in (*self.k_cache, *([] if self.shape.v_from_k else self.v_cache)):
                cache[dst * bs:(dst + 1) * bs] = cache[src * bs:(src + 1) * bs]


# fp32 scores per block of query rows, at most this many (32 MB)
_SCORE_ELEMENTS = 1 << 23


def _blocked_attention(q, k, v, allowed, keys_before, scale, softcap=None, sinks=None) -> torch.Tensor:
    """Attention in fp32 for q [Hq, L, D] over k [Hk, S, D], v [Hk, S, Dv] (grouped-query heads: head h reads KV
    head h // (Hq / Hk)) with `allowed` [L, S] -> [Hq, L, Dv] fp32. Query rows go in blocks; a block of rows < r
    scores only the first `keys_before(r)` keys, so a causal prompt costs half a full one. One bmm per block
    for the scores and one for the values, on fp32 copies: on CPUs this is several times faster than torch's
    bf16 SDPA with a mask (and more exact), and it gives softcapping and attention sinks the same path."""
    hq, n, d = q.shape
    hk, s, dv = k.shape[0], k.shape[1], v.shape[-1]
    g = hq // hk
    kf, vf = k.to(torch.float32), v.to(torch.float32)
    qg = q.reshape(hk, g, n, d)
    rows = max(16, min(128, _SCORE_ELEMENTS // max(1, hq * s)))
    out = torch.empty(hk, g, n, dv, dtype=torch.float32, device=q.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = min(s, keys_before(r1))
        qb = qg[:, :, r0:r1].reshape(hk, g * (r1 - r0), d).to(torch.float32)
        scores = torch.bmm(qb, kf[:, :m].transpose(1, 2)).view(hk, g, r1 - r0, m).mul_(scale)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores.masked_fill_(~allowed[r0:r1, :m], float("-inf"))
        p = softmax_with_sinks(scores, None if sinks is None else sinks.to(torch.float32).view(hk, g, 1, 1))
        out[:, :, r0:r1] = torch.bmm(p.view(hk, g * (r1 - r0), m), vf[:, :m]).view(hk, g, r1 - r0, dv)
    return out.view(hq, n, dv)


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, causal: bool, sliding_window: int | None) -> torch.Tensor:
    """Which keys each query sees: causal (k <= q) or all of them, within a sliding window."""
    if causal:
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        return allowed
    if sliding_window is not None:
        return (kpos - qpos).abs() < sliding_window
    return torch.ones(qpos.shape[0], kpos.shape[1], dtype=torch.bool, device=qpos.device)


def _padding(batch: AttentionBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """index[S, L]: each padded position's token in the flat batch (0 for padding); valid[S, L]."""
    found = batch.scratch.get("sdpa_padding")
    if found is None:
        lens = torch.tensor(batch.query_lens, device=device)
        starts = torch.tensor(batch.query_start_loc[:-1], device=device)
        pos = torch.arange(int(lens.max()), device=device)
        valid = pos[None, :] < lens[:, None]
        index = torch.where(valid, starts[:, None] + pos[None, :], 0)
        found = batch.scratch["sdpa_padding"] = (index, valid)
    return found
