"""Phi-3.5-MoE (HF PhimoeForCausalLM; the Hub's config says PhiMoEForCausalLM): Mixtral's layout
with LayerNorms (weight and bias) instead of RMSNorms, biased q/k/v/o projections
(``attention_bias``), a biased LM head (``lm_head_bias``), longrope whose cos/sin carry
``short_mscale`` / ``long_mscale`` (`nn.rotary`), and sparsemixer routing::

    model.layers.N.{input_layernorm, post_attention_layernorm}.{weight, bias}
    model.layers.N.block_sparse_moe.gate                      router [E, H] (no bias, model dtype)
    model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}      gate / up / down of expert E

**Sparsemixer** (eval mode, as transformers and mistral.rs run it): always two experts. The
first is the arg-max of the router logits ``s``; its weight is its softmax probability over the
logits that lie within a relative distance ``2 * router_jitter_noise`` of the max
(``(max - s) / max(|s|, max) <= 2 eps``; the rest are masked). The second is the arg-max once
the first is masked out, weighted the same way relative to that runner-up. The weights are not
renormalised and stay in the model dtype. (Training's Gumbel sampling and Heun estimator do not
apply to inference.)

transformers 5's fused layout (``mlp.router``, ``mlp.experts.gate_up_proj`` / ``down_proj``)
loads too, split into the per-expert linears.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get, sliding_windows_for
from mistralrs.nn.linear import Linear
from mistralrs.nn.moe import MIXTRAL_EXPERT_NAMES, SparseMoE
from mistralrs.nn.norm import LayerNorm
from mistralrs_plugins.models.mixtral.model import moe_sizes, split_fused_experts


def _sparsemixer_pick(scores: torch.Tensor, masked: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparsemixer choice: the arg-max of `masked` and its probability among the logits of
    `scores` close to that max (transformers' eval branch, same ops)."""
    threshold, ids = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    far = ((threshold - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(dim=-1, index=ids), ids


def sparsemixer(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, 2] in the logits' dtype, expert ids [T, 2])."""
    w1, id1 = _sparsemixer_pick(scores, scores, jitter_eps)
    w2, id2 = _sparsemixer_pick(scores, torch.scatter(scores, -1, id1, float("-inf")), jitter_eps)
    return torch.cat((w1, w2), dim=-1), torch.cat((id1, id2), dim=-1)


class SparseMixerMoE(SparseMoE):
    """Mixtral-named experts routed by `sparsemixer`; expert outputs scaled in the model dtype."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, hidden_act: str, *,
                 jitter_eps: float) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, 2, hidden_act,
                         expert_names=MIXTRAL_EXPERT_NAMES, routing_weights_in_model_dtype=True)
        self.jitter_eps = float(jitter_eps)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsemixer(self.router(x), self.jitter_eps)


class PhiMoEDecoderLayer(DecoderLayer):
    mlp_name = "block_sparse_moe"

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        self.input_layernorm = LayerNorm(s.hidden_size, s.norm_eps)
        self.post_attention_layernorm = LayerNorm(s.hidden_size, s.norm_eps)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        num_experts, top_k = moe_sizes(s.config, arch=s.arch, experts_keys=("num_local_experts",),
                                       default_experts=16, default_top_k=2)
        if top_k != 2:
            raise ModelLoadError(f"config.json: num_experts_per_tok is {top_k}; Phi-3.5-MoE's sparsemixer "
                                 "routing always picks 2 experts, set it to 2")
        return SparseMixerMoE(s.hidden_size, s.intermediate_size, num_experts, s.hidden_act,
                              jitter_eps=float(s.config.get("router_jitter_noise", 0.01)))


class PhiMoEForCausalLM(CausalLM):
    arch_name = "phi3.5moe"
    layer_cls = PhiMoEDecoderLayer
    # transformers 5's in-memory names of the MoE block and its router
    checkpoint_name_map = ((r"(\.layers\.\d+)\.mlp\.router\.", r"\1.block_sparse_moe.gate."),
                           (r"(\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe."))

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.model.norm = LayerNorm(self.s.hidden_size, self.s.norm_eps)
        if self.lm_head is not None:
            self.lm_head = Linear(self.s.hidden_size, self.s.vocab_size, bias=bool(config.get("lm_head_bias", False)))

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        layers = int(config.get("num_hidden_layers") or 0)
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, mlp_bias=False,
            norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-5, arch=cls.arch_name)),  # PhimoeConfig's default
            sliding_windows=sliding_windows_for(config, layers, policy="all"),
        )

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, MIXTRAL_EXPERT_NAMES)
