"""The torch side of `parallel_llama`, imported only when such a model is built.

mistralrs's decoder stack (`mistralrs.nn`) does the heavy lifting: embeddings, rotary
attention over the paged KV cache, gated MLP, norms, weight loading by HF parameter names. A
family only says how its config maps to `DecoderSettings` and, when its block differs from
Llama's, what one layer computes.
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn import CausalLM, DecoderLayer, DecoderSettings


class ParallelBlock(DecoderLayer):
    """x + attn(norm(x)) + mlp(norm(x)): attention and MLP read the same normalised input and
    are added to the residual together (GPT-J, PaLM, Cohere), instead of one after the other."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: Any, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        del self.post_attention_layernorm  # one norm per layer: checkpoints have no second one

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        x = self.input_layernorm(hidden)
        return hidden + self.self_attn(positions, x, batch) + self.mlp(x)


class ParallelLlamaForCausalLM(CausalLM):
    arch_name = "parallel_llama"
    layer_cls = ParallelBlock

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        # The common HF keys (hidden_size, num_attention_heads, ...); small models tie embeddings.
        return DecoderSettings.from_hf(config, arch=cls.arch_name, tie_default=True)
