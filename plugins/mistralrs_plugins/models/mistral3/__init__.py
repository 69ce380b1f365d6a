"""Mistral 3 (``Mistral3ForConditionalGeneration``, ``--arch mistral3``): the Pixtral vision
encoder (2D rope, images at their own size), a patch merger and projector, and a registered
text architecture (Mistral) as the language model. Registration only: the encoder lives in
`.pixtral`, the model in `.model`, the input processor in `.processor`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="mistral3",
        builder="mistralrs_plugins.models.mistral3.model:Mistral3ForConditionalGeneration",
        processor="mistralrs_plugins.models.mistral3.processor:Mistral3Processor",
        kind_of_model="vision",
        hf_architectures=("Mistral3ForConditionalGeneration",),
        model_types=("mistral3",),
        description="Mistral 3 / Mistral Small 3.x with images (Pixtral encoder, 2x2 patch merger, Mistral text)",
    ))
