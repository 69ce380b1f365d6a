"""GGUF ``phi2`` files (Phi-1, Phi-1.5, Phi-2).

llama.cpp's converter (``Phi2Model``) renames HF Phi's ``dense`` / ``fc1`` / ``fc2`` /
``final_layernorm`` to ``attn_output`` / ``ffn_up`` / ``ffn_down`` / ``output_norm`` (LayerNorm
weights and biases, the head's bias as ``output.bias``); the first Phi-2 uploads had a fused
``Wqkv``, which it writes as ``attn_qkv`` (split here into q/k/v). It stores the partial rotary
as ``rope.dimension_count`` (rotated dims per head) and ``feed_forward_length`` as 4 * hidden
whatever the checkpoint says, so the MLP width is read from ``ffn_up`` instead. No rope theta is
written: llama.cpp's 10000 applies.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard, partial_rotary_factor

PHI2_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
PHI2_TOP_NAMES = {"output_norm": "model.final_layernorm"}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    hidden, heads = int(hp.require("embedding_length")), int(hp.scalar("attention.head_count"))
    head_dim = int(hp.get("attention.key_length") or hidden // heads)
    extra: dict[str, Any] = {"head_dim": head_dim, "hidden_act": "gelu_new", "qk_layernorm": False}
    up = gguf.tensors.get("blk.0.ffn_up.weight")
    if up is not None:
        extra["intermediate_size"] = int(up.shape[0])
    prf = partial_rotary_factor(hp, head_dim)
    if prf is not None:
        extra["partial_rotary_factor"] = prf
    return convert_standard(gguf, hf_architecture="PhiForCausalLM", model_type="phi",
                            block_names=PHI2_BLOCK_NAMES, top_names=PHI2_TOP_NAMES, extra_config=extra)
