"""GGUF ``phimoe`` files (Phi-3.5-MoE) back into the HF checkpoint.

llama.cpp's converter (``PhiMoeModel``, a ``Phi3MiniModel``) keeps the separate q/k/v projections
with their biases, stacks ``block_sparse_moe.experts.N.w1/w2/w3`` into ``ffn_{gate,down,up}_exps``
and writes longrope as Phi-3 does (`phi3.gguf.apply_longrope`). The file runs as transformers'
PhiMoE, which is what the weights were trained as; llama.cpp's ``phimoe`` graph approximates
it (RMS norms with the LayerNorm biases added, softmax top-2 instead of sparsemixer, no sliding
window, one ``attn_factor`` for both longrope variants where the checkpoint has
``short_mscale`` / ``long_mscale``). The file does not keep ``router_jitter_noise`` (sparsemixer's
mask threshold at inference) or the two mscales: Phi-3.5-MoE's 0.01 and the file's
``attn_factor`` are used.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import (
    CONSUMED_TENSORS,
    STANDARD_BLOCK_NAMES,
    GgufConversion,
    Hparams,
    map_tensors,
    standard_config,
)
from mistralrs_plugins.models.phi3.gguf import ROPE_FACTOR_TENSORS, apply_longrope

BLOCK_NAMES = {
    **STANDARD_BLOCK_NAMES,
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture="PhimoeForCausalLM", model_type="phimoe", hp=hp)
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]  # as llama.cpp's graph takes it
    config.update({
        "num_local_experts": int(hp.require("expert_count")),
        "num_experts_per_tok": int(hp.require("expert_used_count")),
        "lm_head_bias": "output.bias" in gguf.tensors,
        "router_jitter_noise": 0.01,
        "sliding_window": int(hp.get("attention.sliding_window") or 0) or None,
    })
    apply_longrope(gguf, hp, config)
    parts = map_tensors(gguf, block_names=BLOCK_NAMES, skip=CONSUMED_TENSORS + ROPE_FACTOR_TENSORS)
    return GgufConversion(config=config, parts=parts)
