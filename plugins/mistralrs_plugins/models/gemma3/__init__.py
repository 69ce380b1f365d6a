"""Gemma 3 (text-only causal LM, ``Gemma3ForCausalLM`` / model_type ``gemma3_text``).
Registration only: the torch model lives in `.model` and is imported when a model is
built. The multimodal ``Gemma3ForConditionalGeneration`` is not covered."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="gemma3_text",
        builder="mistralrs_plugins.models.gemma3.model:Gemma3ForCausalLM",
        hf_architectures=("Gemma3ForCausalLM",),
        model_types=("gemma3_text",),
        gguf_architectures=("gemma3",),
        gguf_converter="mistralrs_plugins.models.gemma3.gguf:convert",
        description="Gemma 3 text (sandwich norms, (1 + w) QK-norm, query_pre_attn_scalar, "
                    "sliding/global layer pattern with separate local and global rope, optional softcaps)",
    ))
