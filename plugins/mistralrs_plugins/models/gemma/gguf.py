"""GGUF ``gemma`` files (Gemma 1).

llama.cpp's converter (``GemmaModel``) stores every RMSNorm weight (the HF names ending in
``norm.weight``) as ``1 + w`` and drops ``lm_head.weight`` (its graph always reuses the token
embeddings); it writes head_dim as ``attention.key_length`` and no rope scaling. Undone here:
the norms get 1 subtracted again. The activation is GELU with the tanh approximation (what the
llama.cpp graph runs and what HF's Gemma runs for ``hidden_act: "gelu"``).
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, Transform, add_value, convert_standard


def unit_offset_norms(hf_name: str, info: Any) -> Transform | None:
    """The `transforms` undoing the Gemma converters' ``norm + 1`` (Gemma 1, 2 and 3 store all
    their RMSNorm weights, QK-norms included, with the unit offset folded in)."""
    return add_value(-1.0) if hf_name.endswith("norm.weight") else None


def gemma_head_dim(hp: Hparams) -> int:
    """``attention.key_length``, else llama.cpp's default hidden / heads (HF Gemma's default 256
    does not apply to a GGUF file)."""
    key_length = hp.get("attention.key_length")
    if key_length:
        return int(key_length)
    return int(hp.require("embedding_length")) // int(hp.scalar("attention.head_count"))


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    return convert_standard(
        gguf, hf_architecture="GemmaForCausalLM", model_type="gemma",
        extra_config={"head_dim": gemma_head_dim(hp), "hidden_act": "gelu_pytorch_tanh"},
        transforms=unit_offset_norms,
    )
