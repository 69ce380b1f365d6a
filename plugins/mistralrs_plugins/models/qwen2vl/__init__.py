"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT with 2-D rotary and a patch merger,
the qwen2 text architecture with M-RoPE as the language model. Registration only: the model
lives in `.model`, the vision tower in `.vision`, the input processor (smart resize, patches,
``<|image_pad|>`` expansion, M-RoPE positions; shared with Qwen2.5-VL and Qwen3-VL) in `.processor`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen2vl",
        builder="mistralrs_plugins.models.qwen2vl.model:Qwen2VLForConditionalGeneration",
        processor="mistralrs_plugins.models.qwen2vl.processor:Qwen2VLProcessor",
        kind_of_model="vision",
        hf_architectures=("Qwen2VLForConditionalGeneration",),
        model_types=("qwen2_vl",),
        description="Qwen2-VL (ViT with 2-D rotary and patch merger; qwen2 language model with M-RoPE)",
    ))
