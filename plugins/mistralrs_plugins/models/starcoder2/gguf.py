"""GGUF ``starcoder2`` files.

llama.cpp's converter (``StarCoder2Model``, the common ``TextModel`` parameters) renames the GELU
MLP ``c_fc`` / ``c_proj`` to ``ffn_up`` / ``ffn_down`` and keeps the LayerNorm biases
(``attn_norm.bias``, ``ffn_norm.bias``, ``output_norm.bias``); ``norm_epsilon`` becomes
``attention.layer_norm_epsilon``. It writes no sliding window, and llama.cpp's starcoder2 graph
has none, so the config has none either.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard

STARCODER2_NAMES = {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    hidden, heads = int(hp.require("embedding_length")), int(hp.scalar("attention.head_count"))
    return convert_standard(
        gguf, hf_architecture="Starcoder2ForCausalLM", model_type="starcoder2", block_names=STARCODER2_NAMES,
        extra_config={
            "head_dim": int(hp.get("attention.key_length") or hidden // heads),
            "norm_epsilon": float(hp.get("attention.layer_norm_epsilon", 1e-5)),
            "use_bias": "blk.0.attn_output.bias" in gguf.tensors,
            "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": None,
        },
    )
