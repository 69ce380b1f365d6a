"""GGUF ``granite`` files (Granite 3.x dense).

llama.cpp's converter (``GraniteModel``, a ``LlamaModel``) permutes Q/K rows for its rotary
layout (undone here), drops ``head_dim`` (so head_dim is hidden / heads) and stores the
multipliers under llama.cpp's names: ``embedding_scale`` -> ``embedding_multiplier``,
``residual_scale`` -> ``residual_multiplier``, ``attention.scale`` -> ``attention_multiplier``,
``logit_scale`` -> ``logits_scaling``. Absent ones mean what llama.cpp's graph does without
them: no embedding or residual scaling, the attention scale head_dim ** -0.5.
"""

from __future__ import annotations

from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    if hp.get("rope.scaling.finetuned") is False:
        raise ModelLoadError(f"{hp.where}: a granite model without rotary embeddings (NoPE) is not supported")
    hidden, heads = int(hp.require("embedding_length")), int(hp.scalar("attention.head_count"))
    head_dim = int(hp.get("attention.key_length") or hidden // heads)
    return convert_standard(
        gguf, hf_architecture="GraniteForCausalLM", model_type="granite", permute_qk=True,
        extra_config={
            "head_dim": head_dim,
            "embedding_multiplier": float(hp.get("embedding_scale") or 1.0),
            "residual_multiplier": float(hp.get("residual_scale") or 1.0),
            "attention_multiplier": float(hp.get("attention.scale") or head_dim ** -0.5),
            "logits_scaling": float(hp.require("logit_scale")),
        },
    )
