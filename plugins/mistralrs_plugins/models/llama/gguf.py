"""GGUF ``llama`` files: Llama, Mistral written as Llama, and Mixtral (``llama`` with experts)."""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard

MIXTRAL_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    experts = int(hp.get("expert_count") or 0)
    if experts:
        return convert_standard(
            gguf, hf_architecture="MixtralForCausalLM", model_type="mixtral", permute_qk=True,
            block_names=MIXTRAL_NAMES,
            extra_config={"num_local_experts": experts, "num_experts_per_tok": int(hp.require("expert_used_count"))},
        )
    # llama.cpp's converter permuted Q/K rows for its rotary layout (LlamaModel.permute).
    return convert_standard(gguf, hf_architecture="LlamaForCausalLM", model_type="llama", permute_qk=True)
