"""Turns one scheduled step into a model forward: flat token batch, positions, KV slots, block
tables and recurrent-state slots in; hidden states of the positions that sample out. Image placeholders in the step
get their embeddings from the model's `embed_multimodal` (run once per image per request and
kept on the request) and reach `forward` as ``mm=(flat indices, embeddings)``. Rotary positions
are token indices, except for requests whose images carry multi-component positions (M-RoPE,
`multimodal.inputs.rope_positions`): then `forward` gets ``positions [C, T]`` for steps that
touch such an image and index + the request's position delta for its other tokens. KV slots
always follow token indices.

`prepare` (scheduled step -> `StepInputs`, plain CPU tensors) and `execute` (inputs -> logits) are
separate so a tensor-parallel rank 0 can broadcast the inputs and every rank run the same forward
(`distributed.steps`)."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from mistralrs.engine.scheduler import Scheduled
from mistralrs.multimodal.inputs import has_mm_positions, rope_positions


class ModelRunner:
    def __init__(self, model: Any, backend: Any, device: Any = "cpu") -> None:
        self.model = model
        self.backend = backend
        self.device = torch.device(device)
        self.block_size = backend.block_size
        self.cached = backend.num_blocks > 0
        self.graphs: Any = None  # engine.decode_graphs.DecodeGraphs where decode steps replay graphs

    def forward(self, step: list[Scheduled]) -> tuple[torch.Tensor, list[int]]:
        """Run the model on a step. Returns logits [R, V] (float32) for the R entries of
        `step` that sample, and their indices into `step`."""
        return self.execute(self.prepare(step))

    def prepare(self, step: list[Scheduled]) -> StepInputs:
        """A step as plain CPU tensors and lists: what every tensor-parallel rank needs to run it
        (rank 0 broadcasts this; `execute` runs it)."""
        ids: list[int] = []
        positions: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling: list[int] = []
        mm_index: list[int] = []
        mm_embeds: list[torch.Tensor] = []
        rope: dict[int, torch.Tensor] = {}  # step entry -> its rotary positions, where they are not indices
        for i, item in enumerate(step):
            seq, start, n = item.seq, item.seq.num_computed, item.num_tokens
            for image_idx, mm in enumerate(getattr(seq.request, "mm", ())):
                lo, hi = max(start, mm.offset), min(start + n, mm.end)
                if lo < hi:
                    cache = seq.request.mm_embeds
                    if image_idx not in cache:
                        with torch.inference_mode():
                            cache[image_idx] = self.model.embed_multimodal(mm)
                    mm_embeds.append(cache[image_idx][lo - mm.offset:hi - mm.offset])
                    mm_index.extend(range(len(ids) + lo - start, len(ids) + hi - start))
            ids.extend(seq.tokens[start:start + n])
            items = getattr(seq.request, "mm", ())
            if items and has_mm_positions(items):
                rope[i] = rope_positions(items, start, n)
            positions.extend(range(start, start + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if item.samples:
                sample_rows.append(qsl[-1] - 1)
                sampling.append(i)
        inputs = StepInputs(ids=torch.tensor(ids, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
                            query_start_loc=qsl, seq_lens=seq_lens, sample_rows=sample_rows, sampling=sampling,
                            rope=rope)
        if self.cached:
            # Built as Python lists, one tensor each: a decode step's few entries cost ~15 small torch ops
            # (~0.3 ms) the other way.
            bs = self.block_size
            width = max(len(item.seq.blocks) for item in step)
            tables: list[list[int]] = []
            slots: list[int] = []
            for item in step:
                blocks, start = item.seq.blocks, item.seq.num_computed
                tables.append(blocks + [0] * (width - len(blocks)))
                slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + item.num_tokens))
            inputs.slot_mapping = torch.tensor(slots, dtype=torch.long)
            inputs.block_tables = torch.tensor(tables, dtype=torch.long)
        if self.cached and getattr(self.backend, "states", None) is not None:
            inputs.state_slots = torch.tensor([item.seq.state_slot for item in step], dtype=torch.long)
        if mm_index:
            inputs.mm = (torch.tensor(mm_index, dtype=torch.long), torch.cat(mm_embeds))
        return inputs

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor, list[int]]:
        """The forward of a prepared step: logits [R, V] (float32) of its sampling rows."""
        if self.graphs is not None:
            replayed = self.graphs.run(inputs)
            if replayed is not None:
                return replayed
        dev = self.device
        input_ids = inputs.ids.to(dev)
        pos = inputs.positions.to(dev)
        if inputs.rope:
            pos = self._rope_positions(pos, inputs.rope, inputs.query_start_loc)
        slot_mapping = None if inputs.slot_mapping is None else inputs.slot_mapping.to(dev)
        block_tables = None if inputs.block_tables is None else inputs.block_tables.to(dev)
        state_slots = None if inputs.state_slots is None else inputs.state_slots.to(dev)
        batch = self.backend.batch(inputs.query_start_loc, inputs.seq_lens, slot_mapping, block_tables,
                                   state_slots=state_slots)
        if inputs.mm is not None:
            mm = (inputs.mm[0].to(dev), inputs.mm[1].to(dev))
            hidden = self.model.forward(input_ids, pos, batch, mm=mm)
        else:
            hidden = self.model.forward(input_ids, pos, batch)
        if not inputs.sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32), []
        rows = torch.tensor(inputs.sample_rows, dtype=torch.long, device=hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
        return logits, inputs.sampling

    @staticmethod
    def _rope_positions(pos: torch.Tensor, rope: dict[int, torch.Tensor], qsl: list[int]) -> torch.Tensor:
        """Token indices with the entries of `rope` put in: [T], or [C, T] when any is [C, n]."""
        comps = max((p.shape[0] for p in rope.values() if p.dim() == 2), default=0)
        out = pos.clone() if not comps else pos.unsqueeze(0).repeat(comps, 1)
        for i, p in rope.items():
            out[..., qsl[i]:qsl[i + 1]] = p.to(out.device)
        return out


@attrs.define(kw_only=True)
class StepInputs:
    """One step's model inputs on the CPU (picklable: tensor-parallel rank 0 broadcasts them)."""

    ids: torch.Tensor
    positions: torch.Tensor
    query_start_loc: list[int]
    seq_lens: list[int]
    sample_rows: list[int]
    sampling: list[int]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    mm: tuple[torch.Tensor, torch.Tensor] | None = None
    rope: dict[int, torch.Tensor] = attrs.Factory(dict)  # sequence -> its multi-component rotary positions
    state_slots: torch.Tensor | None = None  # [S] recurrent-state slot per sequence (hybrid models)
