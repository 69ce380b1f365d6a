"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``,
the same model): a SigLIP-style vision transformer over fixed-size tiles, a pixel-shuffle
connector, and a registered text architecture (Llama) as the language model. Each image is split
into a grid of tiles plus a global view, marked in the prompt with ``<fake_token_around_image>``,
``<row_R_col_C>`` and ``<global-img>``. Registration only: the model lives in `.model`, the input
processor in `.processor`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="idefics3",
        builder="mistralrs_plugins.models.idefics3.model:Idefics3ForConditionalGeneration",
        processor="mistralrs_plugins.models.idefics3.processor:Idefics3Processor",
        kind_of_model="vision",
        hf_architectures=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
        model_types=("idefics3", "smolvlm"),
        description="Idefics3 / SmolVLM (SigLIP-style tower over image tiles, pixel-shuffle connector, a text "
                    "architecture as the language model)",
    ))
