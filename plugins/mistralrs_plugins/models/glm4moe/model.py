"""GLM-4.5 / 4.6 / 4.7 (HF Glm4MoeForCausalLM) on the shared decoder::

    model.layers.N.self_attn.{q,k,v}_proj (+ bias when attention_bias), o_proj (no bias)
    model.layers.N.self_attn.{q,k}_norm                       per-head RMSNorm, when use_qk_norm
    model.layers.N.mlp.{gate,up,down}_proj                    dense layers (< first_k_dense_replace)
    model.layers.N.mlp.gate.{weight, e_score_correction_bias} the router
    model.layers.N.mlp.experts.E.{gate,up,down}_proj          routed experts (moe_intermediate_size)
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj     n_shared_experts * moe_intermediate_size

Attention is Llama's with ``partial_rotary_factor`` (0.5 by default) of each head rotated in
NeoX halves (unlike dense GLM-4's pairs). The MoE is DeepSeek-V3's (`..deepseekv2.model`):
float32 sigmoid scores, ``e_score_correction_bias`` for the choice only, ``n_group`` /
``topk_group`` group limit, renormalised (``norm_topk_prob``, default true) and scaled by
``routed_scaling_factor``, plus the shared expert. The multi-token-prediction layers
(``num_nextn_predict_layers``) checkpoints carry after the last layer are skipped.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.moe import QWEN_EXPERT_NAMES
from mistralrs_plugins.models.deepseekv3.model import DeepseekV3DecoderLayer
from mistralrs_plugins.models.mixtral.model import split_fused_experts

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class Glm4MoeDecoderLayer(DeepseekV3DecoderLayer):
    """DeepSeek-V3's feed-forward (dense or routed + shared) under the generic attention."""

    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        return DecoderLayer.build_attention(self, s, layer_idx, rotary, ctx)


def skip_mtp_layers(name: str, num_layers: int) -> bool:
    """True for a checkpoint tensor of a layer past the decoder's (the multi-token-prediction
    layers GLM-4.5+ and DeepSeek-V3 append): inference does not use them."""
    m = _LAYER.match(name)
    return m is not None and int(m[1]) >= num_layers


class Glm4MoeForCausalLM(CausalLM):
    arch_name = "glm4moe"
    layer_cls = Glm4MoeDecoderLayer

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        arch = cls.arch_name
        return DecoderSettings.from_hf(
            config, arch=arch, o_bias=False, mlp_bias=False,
            qk_norm="head" if config.get("use_qk_norm") else None,
            norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-5, arch=arch)),  # Glm4MoeConfig's default
        )

    def map_checkpoint_name(self, name: str) -> str | None:
        if skip_mtp_layers(name, self.s.num_layers):
            return None
        return super().map_checkpoint_name(name)

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, QWEN_EXPERT_NAMES)
