"""Implementation of the paged torch backend (registered in `__init__.py`)."""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.attention import AttentionBatch, KVCacheShape
from mistralrs_plugins.attention.sdpa.backend import SdpaBackend


class PagedBackend(SdpaBackend):
    """Same slot-indexed cache as the reference backend. Every decode token (a sequence with one
    new token) goes through the `paged_attention_decode` kernel, which reads K/V through the block
    tables: the native AVX-512 kernel on such CPUs, the Triton kernel on cuda, else the torch reference
    (gathered blocks, one grouped-query SDPA call for all sequences). Prefill chunks go through the
    `paged_attention_prefill` kernel where one other than the torch reference claims the device (Triton
    on cuda: all the step's chunks in one launch, K/V read through the block tables), else attend per
    sequence as in the reference backend (its fp32 query blocks, faster on CPUs than the op's reference);
    chunks with bidirectional ranges (image tokens) always take the per-sequence path. Decode tokens take
    the same path whether or not prefill shares their step, so a sequence's numerics do not depend on
    what else is batched with it."""

    name = "paged"
    paged = True

    def __init__(self, shape: KVCacheShape) -> None:
        super().__init__(shape)
        from mistralrs.nn.kernels import lookup_accelerated, lookup_kernel

        self.decode_kernel = lookup_kernel("paged_attention_decode", shape.device)
        self.prefill_kernel = lookup_accelerated("paged_attention_prefill", shape.device)

    def prepare(self, batch: AttentionBatch) -> None:
        super().prepare(batch)
        if batch.block_tables is None:
            return
        qlens = batch.query_lens
        decode = [i for i, n in enumerate(qlens) if n == 1]
        prefill = [i for i, n in enumerate(qlens) if n > 1]
        dev = batch.block_tables.device
        if prefill and self.prefill_kernel is not None:
            batch.scratch["paged_prefill_plan"] = self._prefill_plan(batch, prefill, all_prefill=not decode)
        if not decode:
            return
        if len(decode) == len(qlens):  # decode-only step: token i is sequence i
            batch.scratch["paged_decode"] = (None, batch.block_tables, torch.tensor(batch.seq_lens, device=dev))
            return
        rows = torch.tensor([batch.query_start_loc[i] for i in decode], device=dev)
        seqs = torch.tensor(decode, device=dev)
        lens = torch.tensor([batch.seq_lens[i] for i in decode], device=dev)
        batch.scratch["paged_decode"] = (rows, batch.block_tables.index_select(0, seqs), lens)
        batch.scratch["paged_prefill"] = prefill

    def static_decode_batch(self, slot_mapping, block_tables, seq_lens):  # type: ignore[no-untyped-def]
        """Decode-only: `attend` reads nothing but these tensors (the decode kernel takes the block tables
        and lengths as they are; the Python lists of the batch are never read on this path)."""
        n = int(seq_lens.shape[0])
        batch = AttentionBatch(list(range(n + 1)), [1] * n, self, slot_mapping, block_tables)
        batch.scratch["paged_decode"] = (None, block_tables, seq_lens)
        return batch

    @staticmethod
    def _prefill_plan(batch: AttentionBatch, prefill: list[int], all_prefill: bool) -> tuple[Any, ...]:
        """(rows of q or None when the step is all prefill, block tables, seq_lens, query_start_loc) of the
        prefill sequences, for one kernel call per layer."""
        qsl = batch.query_start_loc
        if all_prefill:
            return None, batch.block_tables, batch.seq_lens, qsl
        dev = batch.block_tables.device
        rows = torch.cat([torch.arange(qsl[i], qsl[i + 1], device=dev) for i in prefill])
        starts = [0]
        for i in prefill:
            starts.append(starts[-1] + qsl[i + 1] - qsl[i])
        tables = batch.block_tables.index_select(0, torch.tensor(prefill, device=dev))
        return rows, tables, [batch.seq_lens[i] for i in prefill], starts

    def attend(self, layer, q, k, v, batch, *, scale, sliding_window=None, softcap=None, sinks=None):
        decode = batch.scratch.get("paged_decode")
        plan = None if batch.bidirectional else batch.scratch.get("paged_prefill_plan")
        if (decode is None and plan is None) or not self.write_kv(layer, k, v, batch):
            return super().attend(layer, q, k, v, batch, scale=scale, sliding_window=sliding_window, softcap=softcap,
                                  sinks=sinks)
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        if plan is not None and plan[0] is None:  # prefill-only step: the kernel takes the whole batch
            _, tables, lens, starts = plan
            return self.prefill_kernel(q, kc, vc, tables, lens, starts, self.block_size, scale,
                                       sliding_window, softcap, sinks)
        rows, tables, lens = decode
        if rows is None:
            return self.decode_kernel(q, kc, vc, tables, lens, self.block_size, scale, sliding_window, softcap, sinks)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        out[rows] = self.decode_kernel(q.index_select(0, rows), kc, vc, tables, lens, self.block_size, scale,
                                       sliding_window, softcap, sinks)
        if plan is not None:
            prows, ptables, plens, pstarts = plan
            out[prows] = self.prefill_kernel(q.index_select(0, prows), kc, vc, ptables, plens, pstarts,
                                             self.block_size, scale, sliding_window, softcap, sinks)
            return out
        for i in batch.scratch["paged_prefill"]:
            self.attend_seq(i, layer, q, k, v, batch, out, cached=True, scale=scale,
                            sliding_window=sliding_window, softcap=softcap, sinks=sinks)
        return out
