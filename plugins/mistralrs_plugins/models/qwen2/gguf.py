"""GGUF ``qwen2`` files (llama.cpp's names, no Q/K permutation: Qwen uses HF's rotary layout)."""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, convert_standard


def convert(gguf: Any) -> GgufConversion:
    return convert_standard(gguf, hf_architecture="Qwen2ForCausalLM", model_type="qwen2")
