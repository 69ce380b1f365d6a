"""GGUF ``qwen3moe`` files: experts stacked per layer (``ffn_*_exps``), the router as ``ffn_gate_inp``."""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    return convert_standard(
        gguf, hf_architecture="Qwen3MoeForCausalLM", model_type="qwen3moe",
        extra_config={
            "num_experts": int(hp.require("expert_count")),
            "num_experts_per_tok": int(hp.require("expert_used_count")),
            "moe_intermediate_size": int(hp.require("expert_feed_forward_length")),
            # llama.cpp's qwen3moe graph always renormalizes the top-k weights
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    )
