"""GGUF ``gpt-oss`` files back into the HF checkpoint (per-expert names, which the model takes as
they are).

llama.cpp's ``GptOssModel`` converter splits ``gate_up_proj`` (interleaved gate/up columns) into
``ffn_gate_exps`` / ``ffn_up_exps`` and stores the experts un-transposed (``[E, out, in]``, their
biases ``[E, out]``); MXFP4 checkpoints' experts stay MXFP4 (ggml's block layout, which the
MXFP4 quantizer reads). What the file does not say, its graph fixes, and so does the config:
every other layer slides (the first does: ``set_swa_pattern(2)``), the SwiGLU clamp is 7, and
yarn does not truncate its correction range (GPT-OSS's ``truncate: false``).
"""

from __future__ import annotations

from typing import Any

import attrs

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard, sliding_window_layers

BLOCK_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks": "self_attn.sinks",  # .weight dropped below
    "ffn_gate_inp": "mlp.router",
}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    layers = int(hp.require("block_count"))
    window = sliding_window_layers(hp, layers, 2)
    conv = convert_standard(
        gguf, hf_architecture="GptOssForCausalLM", model_type="gpt_oss", block_names=BLOCK_NAMES,
        extra_config={
            "num_local_experts": int(hp.require("expert_count")),
            "num_experts_per_tok": int(hp.require("expert_used_count")),
            "intermediate_size": int(hp.require("expert_feed_forward_length")),
            "layer_types": ["sliding_attention" if w else "full_attention" for w in window],
            "swiglu_limit": 7.0,
        },
    )
    config = conv.config
    config["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors
    rope = config.get("rope_scaling")
    if rope is not None:
        rope.setdefault("rope_theta", config["rope_theta"])
        if rope.get("rope_type") == "yarn":
            rope["truncate"] = False
    parts = [attrs.evolve(p, hf_name=p.hf_name.removesuffix(".weight")) if p.hf_name.endswith(".sinks.weight") else p
             for p in conv.parts]
    return GgufConversion(config=config, parts=parts)
