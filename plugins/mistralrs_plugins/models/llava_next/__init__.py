"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA's CLIP tower and projector over
"anyres" tiles — a base view of the whole image plus the tiles of the best-fitting grid
resolution — with the tiles' features unpadded and closed row by row with ``image_newline``.
Registration only: the model lives in `.model`, the input processor in `.processor`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="llava_next",
        builder="mistralrs_plugins.models.llava_next.model:LlavaNextForConditionalGeneration",
        processor="mistralrs_plugins.models.llava_next.processor:LlavaNextProcessor",
        kind_of_model="vision",
        hf_architectures=("LlavaNextForConditionalGeneration",),
        model_types=("llava_next",),
        description="LLaVA-NeXT / LLaVA 1.6 (CLIP tower over anyres tiles, image_newline, a text architecture as "
                    "the language model)",
    ))
