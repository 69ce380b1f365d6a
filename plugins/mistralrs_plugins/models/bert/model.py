"""The BERT encoder (HF BertModel): word + absolute position + token-type embeddings and a
LayerNorm, then post-norm blocks (attention → add → LayerNorm, GELU MLP → add → LayerNorm),
attending bidirectionally. Embedding requests are single sentences, so every token has token
type 0, as sentence-transformers gives them. The pooler and any MLM head are not used."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.activation import get_activation
from mistralrs.nn.attention import Attention
from mistralrs.nn.embedding import Embedding
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import LayerNorm

# HF checkpoint names -> this module's (applied in order).
_RENAMES = (
    (r"^bert\.", ""),
    (r"\.gamma$", ".weight"),
    (r"\.beta$", ".bias"),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.output_norm."),
)
_IGNORED = (r"^pooler\.", r"^cls\.", r"^lm_head\.", r"position_ids$", r"token_type_ids$")


def _int(config: dict, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"config.json: {key} must be a positive integer for a BERT model, got {value!r}")
    return value


class BertEmbeddings(nn.Module):
    def __init__(self, config: dict, hidden: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = Embedding(_int(config, "vocab_size"), hidden)
        self.position_embeddings = Embedding(_int(config, "max_position_embeddings"), hidden)
        self.token_type_embeddings = Embedding(int(config.get("type_vocab_size") or 2), hidden)
        self.LayerNorm = LayerNorm(hidden, eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, config: dict, hidden: int, heads: int, eps: float, layer_idx: int, ctx: Any) -> None:
        super().__init__()
        self.attention = Attention(hidden, heads, heads, hidden // heads, layer_idx=layer_idx, qkv_bias=True,
                                   o_bias=True, names=("query", "key", "value", "out"),
                                   device=getattr(ctx, "device", None), registry=getattr(ctx, "registry", None))
        self.attention_norm = LayerNorm(hidden, eps)
        self.up = Linear(hidden, _int(config, "intermediate_size"), bias=True)
        self.down = Linear(_int(config, "intermediate_size"), hidden, bias=True)
        self.output_norm = LayerNorm(hidden, eps)
        self.act = get_activation(str(config.get("hidden_act") or "gelu"))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: Any) -> torch.Tensor:
        x = self.attention_norm(self.attention(positions, x, batch) + x)
        return self.output_norm(self.down(self.act(self.up(x))) + x)


class BertModel(nn.Module):
    """The model-forward contract over a flat batch; `bidirectional` tells the embedding engine
    to attend without a causal mask."""

    arch_name = "bert"
    bidirectional = True
    matryoshka = False

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        kind = config.get("position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            raise ModelLoadError(f"config.json: position_embedding_type {kind!r} is not supported; BERT models with "
                                 "absolute positions are")
        self.config = config
        hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
        if hidden % heads:
            raise ModelLoadError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        eps = float(config.get("layer_norm_eps") or 1e-12)
        self.num_layers, self.num_heads, self.head_dim = _int(config, "num_hidden_layers"), heads, hidden // heads
        self.embeddings = BertEmbeddings(config, hidden, eps)
        self.layers = nn.ModuleList(BertLayer(config, hidden, heads, eps, i, ctx) for i in range(self.num_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor:
        x = self.embeddings(input_ids, positions)
        for layer in self.layers:
            x = layer(positions, x, batch)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("BERT is served as an embedding model; it has no language-model head")

    def kv_cache_shape(self) -> dict[str, int]:
        return dict(num_layers=self.num_layers, num_kv_heads=self.num_heads, head_dim=self.head_dim)

    def map_checkpoint_name(self, name: str) -> str | None:
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        if any(re.search(p, name) for p in _IGNORED):
            return None
        return name
