"""The Qwen3-MoE causal LM (HF Qwen3MoeForCausalLM layout): Qwen3 attention (per-head RMSNorm
on q and k, ``head_dim`` from config, else hidden / heads; ``attention_bias`` on all four
projections) and, on the sparse layers, a top-k mixture of experts::

    model.layers.N.mlp.gate                                      router, [num_experts, H]
    model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}   expert E (moe_intermediate_size)

A layer is sparse unless it is in ``mlp_only_layers`` or ``(N + 1) % decoder_sparse_step != 0``
(or ``num_experts`` is 0); dense layers have an ordinary ``mlp.{gate,up,down}_proj`` of
``intermediate_size``. Routing: float32 softmax, top ``num_experts_per_tok``, renormalised only
when ``norm_topk_prob``; the weights are cast to the model dtype before scaling the experts.
Sliding window: ``sliding_window`` on every layer when ``use_sliding_window`` (as HF; Qwen3-MoE
has no ``max_window_layers`` rule).

Both checkpoint layouts load: per-expert names (Hub, transformers' default ``save_pretrained``)
and transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` (split while loading).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.moe import QWEN_EXPERT_NAMES, SparseMoE
from mistralrs_plugins.models.mixtral.model import moe_sizes, split_fused_experts

# Qwen3MoeConfig's defaults for keys a config.json may omit
_DEFAULTS = dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144)


def is_sparse_layer(config: dict, layer_idx: int, num_experts: int) -> bool:
    step = int(config.get("decoder_sparse_step") or 1)
    if step <= 0:
        raise ModelLoadError(f"config.json: decoder_sparse_step must be positive, got {step}")
    mlp_only = config.get("mlp_only_layers") or []
    return layer_idx not in mlp_only and num_experts > 0 and (layer_idx + 1) % step == 0


class Qwen3MoeDecoderLayer(DecoderLayer):
    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        cfg = s.config
        num_experts, top_k = moe_sizes(cfg, arch=s.arch, experts_keys=("num_experts", "num_local_experts"),
                                       default_experts=_DEFAULTS["num_experts"],
                                       default_top_k=_DEFAULTS["num_experts_per_tok"])
        if not is_sparse_layer(cfg, layer_idx, num_experts):
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act)
        moe_inter = int(cfg_get(cfg, "moe_intermediate_size", _DEFAULTS["moe_intermediate_size"], arch=s.arch))
        return SparseMoE(
            s.hidden_size, moe_inter, num_experts, top_k, s.hidden_act,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), expert_names=QWEN_EXPERT_NAMES,
            routing_weights_in_model_dtype=True,
        )


class Qwen3MoeForCausalLM(CausalLM):
    arch_name = "qwen3moe"
    layer_cls = Qwen3MoeDecoderLayer

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        if config.get("intermediate_size") is None:
            config = {**config, "intermediate_size": _DEFAULTS["intermediate_size"]}
        layers = int(config.get("num_hidden_layers") or 0)
        window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, qk_norm="head", mlp_bias=False,
            sliding_windows=[int(window) if window else None] * layers,
        )

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, QWEN_EXPERT_NAMES)
