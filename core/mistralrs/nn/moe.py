"""Top-k mixture of experts (Mixtral, Qwen2/3-MoE style).

Routing: softmax over the router logits in float32, top-k, optionally renormalised to sum to
one (`norm_topk_prob`; Mixtral always renormalises). The experts are a ModuleList of gated
MLPs whose submodule names are configurable, so checkpoint names map one to one:
``experts.N.w1/w2/w3`` (Mixtral: w1 = gate, w3 = up, w2 = down) or
``experts.N.gate_proj/up_proj/down_proj`` (Qwen). The forward loops over the experts that got
tokens: simple and exact; fused MoE kernels can replace it later.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mistralrs.nn.linear import Linear
from mistralrs.nn.mlp import GatedMLP

MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")  # (gate, up, down)
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def route_topk(
    router_logits: torch.Tensor, top_k: int, *, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """out = sum_k w_k * expert_{id_k}(x) over each token's top-k experts.

    `routing_weights_in_model_dtype`: Qwen-MoE casts the routing weights to the model dtype
    before scaling the expert outputs; Mixtral scales in float32. (Identical in fp32.)
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        hidden_act: str = "silu",
        *,
        norm_topk_prob: bool = True,
        expert_names: Sequence[str] = QWEN_EXPERT_NAMES,
        gate_name: str = "gate",
        experts_name: str = "experts",
        gate_bias: bool = False,
        routing_weights_in_model_dtype: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.norm_topk_prob = bool(norm_topk_prob)
        self.gate_name = gate_name
        self.experts_name = experts_name
        self.routing_weights_in_model_dtype = routing_weights_in_model_dtype
        self.expert_names = tuple(expert_names)  # (gate, up, down) projections of each expert
        setattr(self, gate_name, Linear(hidden_size, self.num_experts, bias=gate_bias))
        setattr(self, experts_name, nn.ModuleList(
            GatedMLP(hidden_size, intermediate_size, hidden_act, names=expert_names) for _ in range(self.num_experts)
        ))

    def stacked_expert_keys(self) -> list[tuple[str, list[str]]]:
        """[(stacked key, [per-expert names])] relative to this module: mistral.rs stores each
        projection of all experts as one ``experts.gate_proj|up_proj|down_proj`` [E, out, in]."""
        e = self.experts_name
        return [(f"{e}.{canonical}", [f"{e}.{i}.{name}" for i in range(self.num_experts)])
                for canonical, name in zip(QWEN_EXPERT_NAMES, self.expert_names)]

    @property
    def router(self) -> Linear:
        return getattr(self, self.gate_name)

    @property
    def expert_list(self) -> nn.ModuleList:
        return getattr(self, self.experts_name)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k]); families with other routing
        (DeepSeek's grouped top-k, GPT-OSS's biased router) override this."""
        return route_topk(self.router(x), self.top_k, norm_topk_prob=self.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x)
        if self.routing_weights_in_model_dtype:
            weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        experts = self.expert_list
        for e in torch.unique(ids).tolist():
            token_idx, k_pos = torch.where(ids == e)
            h = experts[e](x[token_idx])
            h = h * weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out.reshape(shape)
