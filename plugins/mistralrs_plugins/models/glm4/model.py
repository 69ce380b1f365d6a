"""The GLM-4 causal LM (HF Glm4ForCausalLM layout)::

    model.layers.N.{input_layernorm, self_attn.{q,k,v}_proj (+bias), self_attn.o_proj (no bias),
    post_self_attn_layernorm, post_attention_layernorm, mlp.gate_up_proj, mlp.down_proj,
    post_mlp_layernorm}

Block: h = x + post_self_attn_ln(attn(input_ln(x))); out = h + post_mlp_ln(mlp(post_attention_ln(h))).
MLP: one fused ``gate_up_proj`` (gate rows, then up rows) kept fused and split in forward.
Rotary: GPT-J pairwise rotation of the first ``head_dim * partial_rotary_factor`` dims
(factor 0.5 unless config.json says otherwise), forced for this family whatever ``model_type``
says. Glm4Config defaults apply to omitted keys: head_dim 128, attention_bias true,
rms_norm_eps 1.5625e-7.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, _ctx_device, _ctx_registry, cfg_get
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import RMSNorm


class Glm4MLP(nn.Module):
    """down(up * act(gate)) with gate and up from one fused ``gate_up_proj``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.intermediate_size = int(intermediate_size)
        self.gate_up_proj = Linear(hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = Linear(self.intermediate_size, hidden_size, bias=False)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act_fn(gate))


class Glm4DecoderLayer(DecoderLayer):
    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        device, registry = _ctx_device(ctx), _ctx_registry(ctx)
        self.post_self_attn_layernorm = RMSNorm(s.hidden_size, s.norm_eps, device=device, registry=registry)
        self.post_mlp_layernorm = RMSNorm(s.hidden_size, s.norm_eps, device=device, registry=registry)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        return Glm4MLP(s.hidden_size, s.intermediate_size, s.hidden_act)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), batch)
        hidden = hidden + self.post_self_attn_layernorm(attn)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + self.post_mlp_layernorm(mlp)


class Glm4ForCausalLM(CausalLM):
    arch_name = "glm4"
    layer_cls = Glm4DecoderLayer

    def __init__(self, config: dict, ctx: Any = None) -> None:
        # The rotary module picks GLM's pairwise rotation and its 0.5 partial-rotary default from
        # model_type; make sure it says glm4 even for a config.json that omits it.
        if config.get("model_type") != "glm4":
            config = {**config, "model_type": "glm4"}
        super().__init__(config, ctx)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        g = lambda key, default: cfg_get(config, key, default, arch=cls.arch_name)  # noqa: E731
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name,
            head_dim=int(g("head_dim", 128)),  # Glm4Config's default (not hidden / heads)
            qkv_bias=bool(g("attention_bias", True)), o_bias=False, mlp_bias=False,
            norm_eps=float(g("rms_norm_eps", 1.5625e-07)),
        )
