"""The Phi-3 causal LM (HF Phi3ForCausalLM layout: Phi-3/3.5-mini/medium, Phi-4, Phi-4-mini).

Llama's pre-norm block with the checkpoint's fused projections kept fused (one matmul each,
split in forward)::

    model.layers.N.self_attn.qkv_proj  [(H + 2 * KV) * D, hidden]  -> q | k | v
    model.layers.N.mlp.gate_up_proj    [2 * I, hidden]             -> gate | up

config keys: the common decoder keys, ``rms_norm_eps`` (1e-5), ``sliding_window`` (every layer
when set), ``rope_scaling`` longrope/su (``short_factor``/``long_factor``, top-level
``original_max_position_embeddings``), ``partial_rotary_factor`` (Phi-4-mini: 0.75),
``tie_word_embeddings`` (Phi-4-mini: true).

Longrope picks ``long_factor`` when the step's longest sequence exceeds
``original_max_position_embeddings``; keys already cached with ``short_factor`` are not
recomputed when a sequence crosses that length (transformers' generate drops and recomputes
its cache at that point).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.linear import Linear


class Phi3Attention(nn.Module):
    """Attention with the fused ``qkv_proj`` (no biases) and ``o_proj``."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None) -> None:
        super().__init__()
        self.layer_idx = int(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_size = s.num_heads * s.head_dim
        self.kv_size = s.num_kv_heads * s.head_dim
        self.scale = self.head_dim ** -0.5
        window = s.sliding_windows[layer_idx] if s.sliding_windows else None
        self.sliding_window = int(window) if window else None
        self.qkv_proj = Linear(s.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = Linear(self.q_size, s.hidden_size, bias=False)
        object.__setattr__(self, "rotary", rotary)  # owned by the model (model.rotary_emb)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        t = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        out = batch.backend.attend(self.layer_idx, q, k, v, batch, scale=self.scale,
                                   sliding_window=self.sliding_window, softcap=None)
        return self.o_proj(out.reshape(t, self.q_size))

    def extra_repr(self) -> str:
        return (f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, sliding_window={self.sliding_window}")


class Phi3MLP(nn.Module):
    """down(up * act(gate)) with the fused ``gate_up_proj`` = [gate | up]."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act_fn(gate))


class Phi3DecoderLayer(DecoderLayer):
    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        return Phi3Attention(s, layer_idx, rotary)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        return Phi3MLP(s.hidden_size, s.intermediate_size, s.hidden_act)


class Phi3ForCausalLM(CausalLM):
    arch_name = "phi3"
    layer_cls = Phi3DecoderLayer

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        arch = cls.arch_name
        return DecoderSettings.from_hf(
            config, arch=arch, sliding_policy="all",
            norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-5, arch=arch)),  # Phi3Config's default
            qkv_bias=False, o_bias=False, mlp_bias=False,
        )
