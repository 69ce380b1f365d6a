"""GGUF ``glm4`` files.

llama.cpp's converter (``Glm4Model``) keeps the fused ``gate_up_proj`` as ``ffn_up`` (2 *
intermediate rows, loaded fused), names the sandwich norms ``post_attention_norm``
(HF ``post_self_attn_layernorm``), ``ffn_norm`` (``post_attention_layernorm``) and
``post_ffw_norm`` (``post_mlp_layernorm``), and stores the partial rotary as
``rope.dimension_count``. GLM's pairwise rotation is llama.cpp's normal rope, so Q/K are not
permuted.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard, partial_rotary_factor

GLM4_NAMES = {
    "post_attention_norm": "post_self_attn_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
    "ffn_up": "mlp.gate_up_proj",
}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    hidden, heads = int(hp.require("embedding_length")), int(hp.scalar("attention.head_count"))
    # llama.cpp's default hidden / heads (not Glm4Config's 128) when the file has no key_length
    head_dim = int(hp.get("attention.key_length") or hidden // heads)
    extra: dict[str, Any] = {"head_dim": head_dim}
    prf = partial_rotary_factor(hp, head_dim)
    if prf is not None:
        extra["partial_rotary_factor"] = prf
    return convert_standard(gguf, hf_architecture="Glm4ForCausalLM", model_type="glm4", block_names=GLM4_NAMES,
                            extra_config=extra)
