"""LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower, a two-layer projector and
any registered text architecture as the language model. Registration only: the model lives in
`.model`, the input processor (CLIP image preprocessing, ``<image>`` expansion) in `.processor`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="llava",
        builder="mistralrs_plugins.models.llava.model:LlavaForConditionalGeneration",
        processor="mistralrs_plugins.models.llava.processor:LlavaProcessor",
        kind_of_model="vision",
        hf_architectures=("LlavaForConditionalGeneration",),
        model_types=("llava",),
        description="LLaVA 1.5 (CLIP vision tower, MLP projector, a text architecture as the language model)",
    ))
