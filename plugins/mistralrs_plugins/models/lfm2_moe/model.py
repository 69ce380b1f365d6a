"""LFM2 MoE (HF Lfm2MoeForCausalLM): LFM2's decoder (`..lfm2.model`: gated short-conv layers on
the recurrent-state cache beside QK-norm attention, the same names) with the feed-forward of
layer N a SwiGLU of ``intermediate_size`` for N < ``num_dense_layers`` and otherwise routed
experts::

    model.layers.N.feed_forward.{w1, w3, w2}                      dense layers (no width adjustment)
    model.layers.N.feed_forward.gate.weight [E, H]                the router (model dtype)
    model.layers.N.feed_forward.expert_bias [E]                   when use_expert_bias
    model.layers.N.feed_forward.experts.E.{w1, w3, w2}            experts (moe_intermediate_size)

Routing as transformers': sigmoid of the router logits; the top-k chosen on sigmoid + expert_bias
(when ``use_expert_bias``) but weighted by the sigmoid alone, renormalised (``norm_topk_prob``,
+1e-6) and scaled by ``routed_scaling_factor``; no shared expert.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import DecoderSettings, cfg_get
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.moe import MIXTRAL_EXPERT_NAMES, SparseMoE
from mistralrs_plugins.models.lfm2.model import Lfm2DecoderLayer, Lfm2ForCausalLM
from mistralrs_plugins.models.mixtral.model import split_fused_experts

# Lfm2MoeConfig's defaults for keys a config.json may omit
_DEFAULTS = dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=1792, num_dense_layers=2)


class Lfm2MoE(SparseMoE):
    """Sigmoid top-k experts (see the module docstring); ``expert_bias`` only picks the experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 expert_bias: bool, norm_topk_prob: bool, routed_scaling_factor: float) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, "silu",
                         expert_names=MIXTRAL_EXPERT_NAMES, routing_weights_in_model_dtype=True)
        self.expert_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False) if expert_bias else None
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = float(routed_scaling_factor)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.router(x).sigmoid()
        if self.expert_bias is not None:
            ids = (scores.float() + self.expert_bias.float()).topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, ids)
        else:
            weights, ids = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return weights * self.routed_scaling_factor, ids


class Lfm2MoeDecoderLayer(Lfm2DecoderLayer):
    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        g = lambda key: cfg_get(s.config, key, _DEFAULTS[key], arch=s.arch)  # noqa: E731
        if layer_idx < int(g("num_dense_layers")):
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act, names=MIXTRAL_EXPERT_NAMES)
        num_experts, top_k = int(g("num_experts")), int(g("num_experts_per_tok"))
        if not 0 < top_k <= num_experts:
            raise ModelLoadError(f"config.json: num_experts_per_tok ({top_k}) must be in [1, num_experts "
                                 f"({num_experts})]")
        cfg = s.config
        return Lfm2MoE(s.hidden_size, int(g("moe_intermediate_size")), num_experts, top_k,
                       expert_bias=bool(cfg.get("use_expert_bias", True)),
                       norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                       routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0))


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    arch_name = "lfm2_moe"
    layer_cls = Lfm2MoeDecoderLayer

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        # the dense layers take intermediate_size as it is (LFM2's auto-adjusted width is not used)
        s = super().settings({**config, "block_auto_adjust_ff_dim": False})
        return attrs.evolve(s, config=config)

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, MIXTRAL_EXPERT_NAMES)
