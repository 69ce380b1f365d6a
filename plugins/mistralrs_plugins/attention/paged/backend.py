"""Implementation of the paged torch backend (registered in `__init__.py`)."""

from __future__ import annotations

import torch

from mistralrs.attention import AttentionBatch, KVCacheShape
from mistralrs_plugins.attention.sdpa.backend import SdpaBackend


class PagedBackend(SdpaBackend):
    """Same slot-indexed cache as the reference backend. Every decode token (a sequence with one
    new token) goes through the `paged_attention_decode` kernel, which reads K/V through the block
    tables: the native AVX-512 kernel on such CPUs, else the torch reference (gathered blocks, one
    grouped-query SDPA call for all sequences). Prefill chunks attend per sequence as in the
    reference backend. Decode tokens take the same path whether or not prefill shares their step,
    so a sequence's numerics do not depend on what else is batched with it."""

    name = "paged"
    paged = True

    def __init__(self, shape: KVCacheShape) -> None:
        super().__init__(shape)
        from mistralrs.nn.kernels import lookup_kernel

        self.decode_kernel = lookup_kernel("paged_attention_decode", shape.device)

    def prepare(self, batch: AttentionBatch) -> None:
        super().prepare(batch)
        if batch.block_tables is None:
            return
        qlens = batch.query_lens
        decode = [i for i, n in enumerate(qlens) if n == 1]
        if not decode:
            return
        dev = batch.block_tables.device
        if len(decode) == len(qlens):  # decode-only step: token i is sequence i
            batch.scratch["paged_decode"] = (None, batch.block_tables, torch.tensor(batch.seq_lens, device=dev))
            return
        rows = torch.tensor([batch.query_start_loc[i] for i in decode], device=dev)
        seqs = torch.tensor(decode, device=dev)
        lens = torch.tensor([batch.seq_lens[i] for i in decode], device=dev)
        batch.scratch["paged_decode"] = (rows, batch.block_tables.index_select(0, seqs), lens)
        batch.scratch["paged_prefill"] = [i for i, n in enumerate(qlens) if n > 1]

    def attend(self, layer, q, k, v, batch, *, scale, sliding_window=None, softcap=None, sinks=None):
        decode = batch.scratch.get("paged_decode")
        if decode is None or not self.write_kv(layer, k, v, batch):
            return super().attend(layer, q, k, v, batch, scale=scale, sliding_window=sliding_window, softcap=softcap,
                                  sinks=sinks)
        rows, tables, lens = decode
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        if rows is None:
            return self.decode_kernel(q, kc, vc, tables, lens, self.block_size, scale, sliding_window, softcap, sinks)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        out[rows] = self.decode_kernel(q.index_select(0, rows), kc, vc, tables, lens, self.block_size, scale,
                                       sliding_window, softcap, sinks)
        for i in batch.scratch["paged_prefill"]:
            self.attend_seq(i, layer, q, k, v, batch, out, cached=True, scale=scale,
                            sliding_window=sliding_window, softcap=softcap, sinks=sinks)
        return out
