"""GLM-4.7-Flash (HF Glm4MoeLiteForCausalLM): DeepSeek-V3 (`..deepseekv3.model`: multi-head
latent attention over the compressed latent cache, sigmoid ``noaux_tc`` routing with the
correction bias, shared experts, pairwise rope on ``qk_rope_head_dim`` unless ``rope_interleave``
is false) with the dense/sparse choice per layer from ``mlp_layer_types`` ("dense" / "sparse";
default: layer 0 dense, the rest sparse) instead of ``first_k_dense_replace``. The
multi-token-prediction layers after the last decoder layer are skipped, as for V3."""

from __future__ import annotations

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import DecoderSettings
from mistralrs_plugins.models.deepseekv3.model import DeepseekV3DecoderLayer, DeepseekV3ForCausalLM


def mlp_layer_types(config: dict, num_layers: int) -> list[str]:
    types = config.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
    if len(types) != num_layers or set(types) - {"dense", "sparse"}:
        raise ModelLoadError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                             f"{num_layers} layers, got {types!r}")
    return list(types)


class Glm4MoeLiteDecoderLayer(DeepseekV3DecoderLayer):
    def is_moe_layer(self, s: DecoderSettings, layer_idx: int) -> bool:
        return mlp_layer_types(s.config, s.num_layers)[layer_idx] == "sparse"


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    arch_name = "glm4moelite"
    layer_cls = Glm4MoeLiteDecoderLayer
