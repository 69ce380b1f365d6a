"""The Phi causal LM (HF PhiForCausalLM layout: Phi-1, Phi-1.5, Phi-2).

Each block feeds ONE LayerNorm's output to attention and MLP in parallel:
``out = attn(ln(x)) + mlp(ln(x)) + x``. Module names::

    model.embed_tokens  model.layers.N.{input_layernorm, self_attn.{q,k,v}_proj, self_attn.dense,
    [self_attn.{q,k}_layernorm], mlp.{fc1,fc2}}  model.final_layernorm  lm_head (weight + bias)

config keys: the common decoder keys, ``layer_norm_eps`` (1e-5), ``hidden_act`` (gelu_new),
``partial_rotary_factor`` (0.5; top level or in the rope dict), ``qk_layernorm`` (per-head
LayerNorm with bias on q and k before rotary), ``tie_word_embeddings`` (the head then uses the
embedding's weight but keeps its own ``lm_head.bias``, as transformers does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.attention import Attention
from mistralrs.nn.decoder import CausalLM, DecoderSettings, cfg_get
from mistralrs.nn.embedding import Embedding
from mistralrs.nn.linear import Linear
from mistralrs.nn.mlp import MLP
from mistralrs.nn.norm import LayerNorm


class PhiAttention(Attention):
    """q/k/v/dense with biases; optional per-head LayerNorm on q and k (``qk_layernorm``)."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, qk_layernorm: bool) -> None:
        super().__init__(
            s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
            layer_idx=layer_idx, rotary=rotary, qkv_bias=True, o_bias=True,
            sliding_window=s.sliding_windows[layer_idx] if s.sliding_windows else None,
            names=("q_proj", "k_proj", "v_proj", "dense"),
        )
        self.qk_layernorm = bool(qk_layernorm)
        if self.qk_layernorm:
            # transformers sizes these hidden_size // num_attention_heads (== head_dim for Phi)
            self.q_layernorm = LayerNorm(s.hidden_size // s.num_heads, s.norm_eps)
            self.k_layernorm = LayerNorm(s.hidden_size // s.num_heads, s.norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        t = hidden.shape[0]
        q = self.q_proj(hidden).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(t, self.num_kv_heads, self.v_head_dim)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        out = batch.backend.attend(self.layer_idx, q, k, v, batch, scale=self.scale,
                                   sliding_window=self.sliding_window, softcap=None)
        return self.dense(out.reshape(t, self.num_heads * self.v_head_dim))


class PhiDecoderLayer(nn.Module):
    """Parallel block: h = ln(x); out = attn(h) + mlp(h) + x."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, qk_layernorm: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = LayerNorm(s.hidden_size, s.norm_eps)
        self.self_attn = PhiAttention(s, layer_idx, rotary, qk_layernorm)
        self.mlp = MLP(s.hidden_size, s.intermediate_size, s.hidden_act, bias=True, names=("fc1", "fc2"))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        h = self.input_layernorm(hidden)
        return self.self_attn(positions, h, batch) + self.mlp(h) + hidden


class PhiModel(nn.Module):
    """HF's ``model``: embed_tokens, layers, final_layernorm (and the shared rotary embedding)."""

    def __init__(self, config: dict, s: DecoderSettings) -> None:
        super().__init__()
        from mistralrs.nn.rotary import RotaryEmbedding

        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size)
        with torch.device("cpu"):  # frequencies are computed at construction, even in a meta build
            # PhiConfig's partial_rotary_factor default (0.5) is keyed on model_type "phi".
            self.rotary_emb = RotaryEmbedding.from_config({"model_type": "phi", **config}, head_dim=s.head_dim)
        qk_layernorm = bool(config.get("qk_layernorm", False))
        self.layers = nn.ModuleList(
            PhiDecoderLayer(s, i, self.rotary_emb, qk_layernorm) for i in range(s.num_layers)
        )
        self.final_layernorm = LayerNorm(s.hidden_size, s.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, batch)
        return self.final_layernorm(hidden)


class TiedHeadWithBias(nn.Module):
    """The head of a tied Phi: the embedding's weight (not owned) and its own ``bias``."""

    def __init__(self, vocab_size: int, embedding: Embedding) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(vocab_size), requires_grad=False)
        object.__setattr__(self, "embedding", embedding)  # not a submodule: no duplicate parameter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.weight, self.bias)


class PhiForCausalLM(CausalLM):
    arch_name = "phi2"

    def __init__(self, config: dict, ctx: Any = None) -> None:
        nn.Module.__init__(self)  # CausalLM's layout (DecoderModel + bias-free head) does not apply
        self.config = config
        self.s = self.settings(config)
        self.model = PhiModel(config, self.s)
        self._tied = self.s.tie_word_embeddings
        if self._tied:
            self.lm_head = TiedHeadWithBias(self.s.vocab_size, self.model.embed_tokens)
        else:
            self.lm_head = Linear(self.s.hidden_size, self.s.vocab_size, bias=True)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        arch = cls.arch_name
        return DecoderSettings.from_hf(
            config, arch=arch,
            norm_eps=float(cfg_get(config, "layer_norm_eps", 1e-5, arch=arch)),
            hidden_act=str(cfg_get(config, "hidden_act", "gelu_new", arch=arch)),
            qkv_bias=True, o_bias=True, mlp_bias=True,
        )

    def map_checkpoint_name(self, name: str) -> str | None:
        if self._tied and name == "lm_head.weight":
            return None  # the embedding's copy
        return super().map_checkpoint_name(name)

    @property
    def tied_embeddings(self) -> bool:
        return self._tied
