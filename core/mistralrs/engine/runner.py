"""Turns one scheduled step into a model forward: flat token batch, positions, KV slots, block
tables and recurrent-state slots in; hidden states of the positions that sample out. Image
placeholders in the step get their embeddings from the model's `embed_multimodal` (run once per
image per request and kept on the request) and reach `forward` as ``mm=(flat indices, embeddings)``."""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.engine.scheduler import Scheduled


class ModelRunner:
    def __init__(self, model: Any, backend: Any, device: Any = "cpu") -> None:
        self.model = model
        self.backend = backend
        self.device = torch.device(device)
        self.block_size = backend.block_size
        self.cached = backend.num_blocks > 0

    @torch.inference_mode()
    def forward(self, step: list[Scheduled]) -> tuple[torch.Tensor, list[int]]:
        """Run the model on a step. Returns logits [R, V] (float32) for the R entries of
        `step` that sample, and their indices into `step`."""
        ids: list[int] = []
        positions: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling: list[int] = []
        mm_index: list[int] = []
        mm_embeds: list[torch.Tensor] = []
        for i, item in enumerate(step):
            seq, start, n = item.seq, item.seq.num_computed, item.num_tokens
            for image_idx, mm in enumerate(getattr(seq.request, "mm", ())):
                lo, hi = max(start, mm.offset), min(start + n, mm.end)
                if lo < hi:
                    cache = seq.request.mm_embeds
                    if image_idx not in cache:
                        cache[image_idx] = self.model.embed_multimodal(mm)
                    mm_embeds.append(cache[image_idx][lo - mm.offset:hi - mm.offset])
                    mm_index.extend(range(len(ids) + lo - start, len(ids) + hi - start))
            ids.extend(seq.tokens[start:start + n])
            positions.extend(range(start, start + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if item.samples:
                sample_rows.append(qsl[-1] - 1)
                sampling.append(i)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        slot_mapping = block_tables = None
        if self.cached:
            width = max(len(item.seq.blocks) for item in step)
            tables = torch.zeros(len(step), width, dtype=torch.long)
            for i, item in enumerate(step):
                tables[i, : len(item.seq.blocks)] = torch.tensor(item.seq.blocks, dtype=torch.long)
            seq_index = torch.repeat_interleave(
                torch.arange(len(step)), torch.tensor([item.num_tokens for item in step])
            )
            pos_cpu = torch.tensor(positions, dtype=torch.long)
            bs = self.block_size
            slot_mapping = (tables[seq_index, pos_cpu // bs] * bs + pos_cpu % bs).to(dev)
            block_tables = tables.to(dev)
        state_slots = None
        if self.cached and getattr(self.backend, "states", None) is not None:
            state_slots = torch.tensor([item.seq.state_slot for item in step], dtype=torch.long, device=dev)
        batch = self.backend.batch(qsl, seq_lens, slot_mapping, block_tables, state_slots=state_slots)
        if mm_index:
            mm = (torch.tensor(mm_index, dtype=torch.long, device=dev), torch.cat(mm_embeds).to(dev))
            hidden = self.model.forward(input_ids, pos, batch, mm=mm)
        else:
            hidden = self.model.forward(input_ids, pos, batch)
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32), []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
        return logits, sampling
