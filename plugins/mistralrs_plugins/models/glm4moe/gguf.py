"""GGUF ``glm4moe`` files (GLM-4.5, 4.6, 4.7) back into the HF checkpoint.

llama.cpp's ``Glm4MoeModel`` converter keeps the HF tensor layout (NeoX rotary halves: no Q/K
permutation), stacks the routed experts into ``ffn_*_exps``, names the shared expert
``ffn_*_shexp``, the pre-FFN norm ``post_attention_norm`` and the router's correction bias ``exp_probs_b``; the partial rotary is
``rope.dimension_count``. It appends the multi-token-prediction layers to ``block_count``
(``nextn_predict_layers``): they are left out (`trunk_layers`), as the safetensors model skips
them. The router is sigmoid-scored (the only ``expert_gating_func`` GLM-4.5 has).
"""

from __future__ import annotations

from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard, partial_rotary_factor, trunk_layers

BLOCK_NAMES = {
    "post_attention_norm": "post_attention_layernorm",  # the pre-FFN norm, under gguf's GLM name
    "exp_probs_b": "mlp.gate.e_score_correction",  # .bias -> e_score_correction_bias below
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    layers, mtp = trunk_layers(gguf, hp)
    gating = int(hp.get("expert_gating_func", _SIGMOID))
    if gating != _SIGMOID:
        raise ModelLoadError(f"{hp.where}: metadata 'glm4moe.expert_gating_func' is {gating}; GLM-4.5's router is "
                             "sigmoid-scored (2)")
    conv = convert_standard(
        gguf, hf_architecture="Glm4MoeForCausalLM", model_type="glm4_moe", block_names=BLOCK_NAMES, skip=mtp,
        extra_config={
            "num_hidden_layers": layers,
            "n_routed_experts": int(hp.require("expert_count")),
            "num_experts_per_tok": int(hp.require("expert_used_count")),
            "moe_intermediate_size": int(hp.require("expert_feed_forward_length")),
            "n_shared_experts": int(hp.get("expert_shared_count", 0)),
            "first_k_dense_replace": int(hp.get("leading_dense_block_count", 0)),
            "routed_scaling_factor": float(hp.get("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(hp.get("expert_weights_norm", False)),
            "n_group": int(hp.get("expert_group_count", 1) or 1),
            "topk_group": int(hp.get("expert_group_used_count", 1) or 1),
            "use_qk_norm": "blk.0.attn_q_norm.weight" in gguf.tensors,
        },
    )
    config = conv.config
    config["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    config["head_dim"] = head_dim
    prf = partial_rotary_factor(hp, head_dim)
    if prf is not None:
        config["partial_rotary_factor"] = prf
    if config.get("rope_scaling") is not None:
        config["rope_scaling"].setdefault("rope_theta", config["rope_theta"])
    return GgufConversion(config=config, parts=correction_bias_names(conv.parts))


def correction_bias_names(parts: list) -> list:
    """``exp_probs_b.bias`` (mapped to ``...e_score_correction.bias``) under HF's name."""
    import attrs

    suffix = ".e_score_correction.bias"
    return [attrs.evolve(p, hf_name=p.hf_name.removesuffix(suffix) + ".e_score_correction_bias")
            if p.hf_name.endswith(suffix) else p for p in parts]
