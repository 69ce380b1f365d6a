"""DeepSeek-V3 / R1 (HF DeepseekV3ForCausalLM): the V2 model (`..deepseekv2.model`) with V3
routing: sigmoid scores, ``e_score_correction_bias`` for the choice, groups ranked by the sum of
their two best experts (``noaux_tc``), renormalised top-k times ``routed_scaling_factor``. The
multi-token-prediction layers a checkpoint carries after the last decoder layer are skipped."""

from __future__ import annotations

from mistralrs_plugins.models.deepseekv2.model import DeepseekDecoderLayer, DeepseekV2ForCausalLM


class DeepseekV3DecoderLayer(DeepseekDecoderLayer):
    v3 = True


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    arch_name = "deepseekv3"
    layer_cls = DeepseekV3DecoderLayer
