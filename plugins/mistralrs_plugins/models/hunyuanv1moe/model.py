"""HunYuan MoE (HF HunYuanMoEV1ForCausalLM, e.g. Hunyuan-A13B) on the shared decoder::

    model.layers.N.self_attn.*                         HunYuan dense's (`..hunyuanv1dense.model`)
    model.layers.N.mlp.gate.wg.weight [E, H]           the router, a float32 matmul
    model.layers.N.mlp.experts.E.{gate,up,down}_proj   routed experts (intermediate_size)
    model.layers.N.mlp.shared_mlp.{gate,up,down}_proj  always on (intermediate_size)

Every layer is sparse. Routing as transformers': softmax of the float32 router logits, top-k,
renormalised to sum to one (also for k = 1), the weights kept in float32 when they scale the
expert outputs. ``num_experts`` and ``moe_topk`` may be per-layer lists. The router is a plain
float32 parameter rather than a linear layer, so ISQ leaves it alone (transformers keeps it in
float32 whatever the model dtype).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.moe import QWEN_EXPERT_NAMES, SparseMoE, route_topk
from mistralrs_plugins.models.hunyuanv1dense.model import QK_NORM_NAMES, hunyuan_settings
from mistralrs_plugins.models.mixtral.model import split_fused_experts


def per_layer(config: dict, key: str, layer_idx: int, default: int) -> int:
    """An int config value or, as HunYuan allows, a list with one value per layer."""
    value = config.get(key, default)
    if isinstance(value, list):
        if len(value) <= layer_idx:
            raise ModelLoadError(f"config.json: {key} lists {len(value)} values; num_hidden_layers needs one "
                                 "per layer")
        value = value[layer_idx]
    return int(value)


class Float32Router(nn.Module):
    """``weight [E, H]``; forward -> the float32 router logits [T, E]."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class HunYuanMoE(SparseMoE):
    """Routed experts (always renormalised top-k of the float32 softmax) plus ``shared_mlp``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 hidden_act: str) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, hidden_act,
                         expert_names=QWEN_EXPERT_NAMES, routing_weights_in_model_dtype=False)
        self.gate = Float32Router(hidden_size, num_experts)  # replaces SparseMoE's linear router
        self.shared_mlp = GatedMLP(hidden_size, intermediate_size, hidden_act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_topk(self.router(x), self.top_k, norm_topk_prob=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shared_mlp(x)


class HunYuanMoEV1DecoderLayer(DecoderLayer):
    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        num_experts = per_layer(s.config, "num_experts", layer_idx, 1)
        top_k = per_layer(s.config, "moe_topk", layer_idx, 1)
        if not 0 < top_k <= num_experts:
            raise ModelLoadError(f"config.json: moe_topk ({top_k}) must be in [1, num_experts ({num_experts})] "
                                 f"(layer {layer_idx})")
        return HunYuanMoE(s.hidden_size, s.intermediate_size, num_experts, top_k, s.hidden_act)


class HunYuanMoEV1ForCausalLM(CausalLM):
    arch_name = "hunyuanv1moe"
    layer_cls = HunYuanMoEV1DecoderLayer
    checkpoint_name_map = (*QK_NORM_NAMES, (r"\.mlp\.gate\.wg\.", ".mlp.gate."))

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return hunyuan_settings(config, cls.arch_name)

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, QWEN_EXPERT_NAMES)
