"""Implementation of the paged torch backend (see paged.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralrs.attention import AttentionBatch
from mistralrs_plugins.attention.sdpa_backend import SdpaBackend, read_slots, write_slots


class PagedBackend(SdpaBackend):
    """Same slot-indexed cache as the reference backend; decode-only steps are batched:
    `prepare` builds one padded [S, L] slot index and mask per step, shared by all layers."""

    name = "paged"
    paged = True

    def prepare(self, batch: AttentionBatch) -> None:
        super().prepare(batch)
        if batch.block_tables is None or not batch.is_decode_only:
            return
        bs = self.block_size
        lens = torch.tensor(batch.seq_lens)
        width = int(lens.max())
        pos = torch.arange(width)
        tables = batch.block_tables.long()
        blk = tables.gather(1, (pos // bs).clamp(max=tables.shape[1] - 1).expand(len(lens), -1))
        slots = blk * bs + pos % bs
        valid = pos[None, :] < lens[:, None]
        batch.scratch["paged_slots"] = slots.masked_fill(~valid, 0).to(batch.block_tables.device)
        batch.scratch["paged_valid"] = valid.to(batch.block_tables.device)
        batch.scratch["paged_pos"] = (lens - 1).to(batch.block_tables.device)
        batch.scratch["paged_kpos"] = pos.to(batch.block_tables.device)
        batch.scratch["paged_full"] = bool(valid.all())  # every key visible: no mask needed

    def attend(self, layer, q, k, v, batch, *, scale, sliding_window=None, softcap=None):
        slots = batch.scratch.get("paged_slots")
        if slots is None or softcap is not None:
            return super().attend(layer, q, k, v, batch, scale=scale, sliding_window=sliding_window, softcap=softcap)
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        write_slots(kc, batch.slot_mapping, k)
        write_slots(vc, batch.slot_mapping, v)
        S, width = slots.shape
        hq, hk = q.shape[1], k.shape[1]
        flat = slots.reshape(-1)
        keys = read_slots(kc, flat, q.dtype).view(S, width, hk, -1).transpose(1, 2)  # [S, Hk, L, D]
        vals = read_slots(vc, flat, q.dtype).view(S, width, hk, -1).transpose(1, 2)
        mask = None if batch.scratch["paged_full"] else batch.scratch["paged_valid"]
        if sliding_window is not None and width > sliding_window:
            window = batch.scratch["paged_kpos"][None, :] > batch.scratch["paged_pos"][:, None] - sliding_window
            mask = window if mask is None else mask & window
        # One decode query per sequence: put each KV head's group of query heads on the
        # "query length" axis ([S, Hkv, group, D]) so SDPA runs a real GQA matmul instead of
        # repeating K/V per query head (measured ~7x faster on CPU).
        qs = q.view(S, hk, hq // hk, -1)
        out = F.scaled_dot_product_attention(
            qs, keys, vals, attn_mask=None if mask is None else mask[:, None, None, :], scale=scale,
        )
        return out.reshape(S, hq, -1)
