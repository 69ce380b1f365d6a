"""Gemma 2. Registration only: the torch model lives in `.model` and is imported when a
model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="gemma2",
        builder="mistralrs_plugins.models.gemma2.model:Gemma2ForCausalLM",
        hf_architectures=("Gemma2ForCausalLM",),
        model_types=("gemma2",),
        gguf_architectures=("gemma2",),
        gguf_converter="mistralrs_plugins.models.gemma2.gguf:convert",
        description="Gemma 2 (sandwich norms, attention and final logit softcapping, "
                    "query_pre_attn_scalar, alternating sliding-window layers)",
    ))
