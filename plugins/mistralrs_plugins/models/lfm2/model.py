"""LFM2 / LFM2.5 (HF Lfm2ForCausalLM): a pre-norm decoder whose layers are gated short
convolutions or GQA attention (``layer_types``: "conv" / "full_attention"; older configs list
``full_attn_idxs``), each followed by a SwiGLU feed-forward::

    model.layers.N.conv.{in_proj [3H, H], conv.weight [H, 1, L], conv.bias?, out_proj}    conv layers
    model.layers.N.self_attn.{q,k,v}_proj, out_proj, {q,k}_layernorm                      attention layers
    model.layers.N.{operator_norm, ffn_norm}, feed_forward.{w1, w3, w2}
    model.embedding_norm                                                                  the final norm

**Short conv.** ``B, C, x = in_proj(h)``; ``y = C * conv(B * x)`` with a causal depthwise conv of
kernel ``conv_L_cache`` (no activation); ``out_proj(y)``. Its state per sequence is the last
``conv_L_cache - 1`` values of ``B * x`` (the recurrent-state cache, `mistralrs.state_cache`; prefix
caching is off for this model). Attention has per-head RMSNorm on q and k and NeoX rope. The
feed-forward width is ``intermediate_size`` (``block_ff_dim``), or with
``block_auto_adjust_ff_dim`` ``2/3`` of it times ``block_ffn_dim_multiplier`` rounded up to
``block_multiple_of``. Embeddings are tied by default. Attention layers are numbered among
themselves for the KV cache, conv layers among theirs for the state cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.linear import Linear
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.moe import MIXTRAL_EXPERT_NAMES
from mistralrs.nn.recurrent import DepthwiseConv1d, causal_conv1d, causal_conv1d_step, scan_sequences


def lfm2_layer_types(config: dict, num_layers: int) -> list[str]:
    types = config.get("layer_types")
    if types is None:
        full = config.get("full_attn_idxs")
        full = set(range(num_layers)) if full is None else set(full)
        types = ["full_attention" if i in full else "conv" for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"conv", "full_attention"}:
        raise ModelLoadError(f"config.json: layer_types must give 'conv' or 'full_attention' for each of the "
                             f"{num_layers} layers, got {types!r}")
    return list(types)


def lfm2_ff_dim(config: dict, *, arch: str) -> int:
    size = int(cfg_get(config, ("block_ff_dim", "intermediate_size"), 12288, arch=arch))
    if config.get("block_auto_adjust_ff_dim", True):
        size = int(2 * size / 3)
        multiplier = config.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            multiple = int(config.get("block_multiple_of", 256))
            size = int(multiplier * size)
            size = multiple * ((size + multiple - 1) // multiple)
    return size


class ShortConv(nn.Module):
    """LFM2's gated short convolution (see the module docstring)."""

    def __init__(self, hidden_size: int, kernel: int, bias: bool, *, state_idx: int) -> None:
        super().__init__()
        self.state_idx, self.hidden_size, self.kernel = state_idx, hidden_size, kernel
        self.in_proj = Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.conv = DepthwiseConv1d(hidden_size, kernel, bias)
        self.out_proj = Linear(hidden_size, hidden_size, bias=bias)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv": (self.hidden_size, self.kernel - 1)}

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        b, c, x = self.in_proj(hidden).chunk(3, dim=-1)
        weight, bias = self.conv.weight[:, 0], self.conv.bias

        def step(rows, st):
            y, conv = causal_conv1d_step(rows[0], st["conv"], weight, bias)
            return y, {"conv": conv}

        def chunk(rows, st):
            y, conv = causal_conv1d(rows[0], st["conv"], weight, bias)
            return y, {"conv": conv}

        states = batch.backend.read_state(self.state_idx, batch, device=hidden.device)
        y, states = scan_sequences(batch, (b * x,), states, step, chunk)
        batch.backend.write_state(self.state_idx, batch, states)
        return self.out_proj(c * y)


class Lfm2DecoderLayer(DecoderLayer):
    """The shared pre-norm block; a conv layer's operator is ``conv`` (HF's name), an attention
    layer's ``self_attn``."""

    mlp_name = "feed_forward"

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        if isinstance(self.self_attn, ShortConv):
            self.conv = self.self_attn
            del self.self_attn

    @property
    def mixer(self) -> nn.Module:
        return self.conv if hasattr(self, "conv") else self.self_attn

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        hidden = hidden + self.mixer(positions, self.input_layernorm(hidden), batch)
        return hidden + self.ffn(self.post_attention_layernorm(hidden))

    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        types = lfm2_layer_types(s.config, s.num_layers)
        index = types[:layer_idx].count(types[layer_idx])  # numbered among layers of its kind
        if types[layer_idx] == "conv":
            return ShortConv(s.hidden_size, int(s.config.get("conv_L_cache", 3)), bool(s.config.get("conv_bias")),
                             state_idx=index)
        return DecoderLayer.build_attention(self, s, index, rotary, ctx)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act, names=MIXTRAL_EXPERT_NAMES)


class Lfm2ForCausalLM(CausalLM):
    arch_name = "lfm2"
    layer_cls = Lfm2DecoderLayer
    # HF names -> the shared decoder's
    checkpoint_name_map = (
        (r"^model\.embedding_norm\.", "model.norm."),
        (r"\.operator_norm\.", ".input_layernorm."),
        (r"\.ffn_norm\.", ".post_attention_layernorm."),
        (r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."),
        (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm."),
        (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    )

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.layer_types = lfm2_layer_types(config, self.s.num_layers)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        arch = cls.arch_name
        return DecoderSettings.from_hf(
            config, arch=arch, intermediate_size=lfm2_ff_dim(config, arch=arch), qk_norm="head",
            norm_eps=float(cfg_get(config, "norm_eps", 1e-5, arch=arch)), hidden_act="silu",
            tie_word_embeddings=bool(config.get("tie_embedding", config.get("tie_word_embeddings", True))),
            qkv_bias=False, o_bias=False,
        )

    def kv_cache_shape(self) -> dict[str, int]:
        return {**super().kv_cache_shape(), "num_layers": self.layer_types.count("full_attention")}

    def recurrent_state_shape(self) -> dict[str, Any]:
        convs = [layer.conv for layer in self.model.layers if hasattr(layer, "conv")]
        return {"num_layers": len(convs), "states": convs[0].state_shapes()} if convs else {}
