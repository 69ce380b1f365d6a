"""The Granite causal LM (HF GraniteForCausalLM layout).

Llama's layout and weights with four scalars from config.json (GraniteConfig defaults 1.0):

* ``embedding_multiplier``: the token embeddings are multiplied by it;
* ``attention_multiplier``: the attention scale (replaces ``head_dim ** -0.5``);
* ``residual_multiplier``: each block adds ``multiplier * attn(...)`` and ``multiplier * mlp(...)``
  to the residual stream;
* ``logits_scaling``: the logits are divided by it.

The multipliers are applied as Python floats, as HF does: in bf16 torch multiplies in float32
with the unrounded scalar and rounds once (rounding the scalar to bf16 first, as Gemma's
embedding scale does, would differ). The logits are divided in float32 (after the head's
output is upcast), which is at least as accurate as HF's division in the model dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings
from mistralrs.nn.embedding import Embedding

_MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def granite_scalar(config: dict, key: str) -> float:
    """config[key] as a float (GraniteConfig's default 1.0 when absent or null)."""
    value = config.get(key)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"config.json: {key} must be a number, got {value!r}")
    if key == "logits_scaling" and value == 0:
        raise ModelLoadError("config.json: logits_scaling must not be 0 (the logits are divided by it)")
    return float(value)


class GraniteEmbedding(Embedding):
    """Token embeddings times ``embedding_multiplier`` (a Python float, as in HF)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, multiplier: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.multiplier = float(multiplier)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.multiplier

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, multiplier={self.multiplier}"


class GraniteDecoderLayer(DecoderLayer):
    """Llama's block with the sublayer outputs scaled by ``residual_multiplier``."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        self.residual_multiplier = granite_scalar(s.config, "residual_multiplier")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), batch)
        hidden = hidden + attn * self.residual_multiplier
        return hidden + self.ffn(self.post_attention_layernorm(hidden)) * self.residual_multiplier


class GraniteForCausalLM(CausalLM):
    """config keys: the common decoder keys (``attention_bias``, ``mlp_bias``, ``head_dim``,
    ``tie_word_embeddings`` (default false), ``rope_parameters`` / ``rope_theta`` /
    ``rope_scaling``) plus ``embedding_multiplier``, ``attention_multiplier``,
    ``residual_multiplier`` and ``logits_scaling``."""

    arch_name = "granite"
    layer_cls = GraniteDecoderLayer

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        # same parameter name (model.embed_tokens.weight); replaced before any weight is loaded
        self.model.embed_tokens = GraniteEmbedding(
            self.s.vocab_size, self.s.hidden_size, multiplier=granite_scalar(config, "embedding_multiplier"),
        )
        self.logits_scaling = granite_scalar(config, "logits_scaling")

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        for key in _MULTIPLIERS:
            granite_scalar(config, key)  # validate early, with a one-line error
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, attn_scale=granite_scalar(config, "attention_multiplier"),
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        return logits / self.logits_scaling if self.logits_scaling != 1.0 else logits
