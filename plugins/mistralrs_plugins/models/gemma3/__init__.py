"""Gemma 3: the text-only causal LM (``Gemma3ForCausalLM`` / model_type ``gemma3_text``) and
the vision-language ``Gemma3ForConditionalGeneration`` (``--arch gemma3``: a SigLIP tower and
this text model). Registration only: the text model lives in `.model`, the vision model in
`.vision` (tower in `.siglip`), its input processor in `.processor`."""

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
    register(ArchitectureSpec(
        name="gemma3",
        builder="mistralrs_plugins.models.gemma3.vision:Gemma3ForConditionalGeneration",
        processor="mistralrs_plugins.models.gemma3.processor:Gemma3Processor",
        kind_of_model="vision",
        hf_architectures=("Gemma3ForConditionalGeneration",),
        model_types=("gemma3",),
        description="Gemma 3 with images (SigLIP tower, pooled soft tokens, bidirectional attention within an image)",
    ))
