"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): the Qwen3-VL vision transformer and the
registered ``qwen3`` text architecture with interleaved M-RoPE (t/h/w frequencies interleaved
rather than in sections). DeepStack: the vision tower's `embed_multimodal` rows carry the merged
tokens and, side by side, one feature per DeepStack layer; the first of them replaces the
placeholder embeddings, the others are added to those tokens' hidden states after language-model
layers 0, 1, ... (the engine slices rows only, so chunked prefill keeps them aligned)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs_plugins.models.qwen2vl.model import QwenVLBase
from mistralrs_plugins.models.qwen3vl.vision import Qwen3VisionTransformer


class Qwen3VLForConditionalGeneration(QwenVLBase):
    text_model_type = "qwen3"
    text_architecture = "Qwen3ForCausalLM"
    default_mrope_section = [24, 20, 20]
    mrope_interleaved = True

    def build_vision(self, vision: dict, text_hidden: int) -> nn.Module:
        return Qwen3VisionTransformer(vision, int(vision.get("out_hidden_size", text_hidden)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any,
                mm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        lm = self.language_model.model
        if mm is None:
            return lm(input_ids, positions, batch)
        index, values = mm
        hidden_size = lm.embed_tokens.weight.shape[-1]
        main, *deep = values.split(hidden_size, dim=-1)
        hidden = self._embeds(input_ids, (index, main))
        for i, layer in enumerate(lm.layers):
            hidden = layer(positions, hidden, batch)
            if i < len(deep):
                hidden = hidden.index_add(0, index, deep[i].to(hidden.dtype))
        return lm.norm(hidden)
