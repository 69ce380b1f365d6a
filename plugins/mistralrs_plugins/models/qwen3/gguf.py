"""GGUF ``qwen3`` files (QK-norm as ``attn_q_norm``/``attn_k_norm``; no Q/K permutation)."""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, convert_standard


def convert(gguf: Any) -> GgufConversion:
    return convert_standard(gguf, hf_architecture="Qwen3ForCausalLM", model_type="qwen3")
