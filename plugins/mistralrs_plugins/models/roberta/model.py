"""RoBERTa / XLM-RoBERTa: BERT's encoder with one difference that matters — position ids start
after the padding id (transformers' ``create_position_ids_from_input_ids``: a sequence's
non-padding tokens get ``padding_idx + 1, padding_idx + 2, ...``, padding tokens ``padding_idx``).
Checkpoints of the masked-LM classes carry a ``roberta.`` prefix."""

from __future__ import annotations

import re
from typing import Any

import torch

from mistralrs_plugins.models.bert.model import BertModel


def roberta_positions(input_ids: torch.Tensor, positions: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Per sequence of a flat batch (each sequence's `positions` start at 0), transformers'
    RoBERTa position ids: the running count of non-padding tokens, offset by `padding_idx`."""
    mask = (input_ids != padding_idx).long()
    cum = torch.cumsum(mask, 0)
    starts = positions == 0
    before = (cum - mask)[starts]  # non-padding tokens before each sequence
    seq = torch.cumsum(starts.long(), 0) - 1
    return (cum - before[seq]) * mask + padding_idx


class RobertaModel(BertModel):
    arch_name = "roberta"

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.padding_idx = int(config.get("pad_token_id", 1) if config.get("pad_token_id") is not None else 1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor:
        x = self.embeddings(input_ids, roberta_positions(input_ids, positions, self.padding_idx))
        for layer in self.layers:
            x = layer(positions, x, batch)
        return x

    def map_checkpoint_name(self, name: str) -> str | None:
        return super().map_checkpoint_name(re.sub(r"^roberta\.", "", name))
