"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a window-attention ViT with 2-D rotary and
patch merger, the qwen2 text architecture with M-RoPE as the language model. Registration only:
the model lives in `.model`, the vision tower in `.vision`; the input processor is Qwen2-VL's."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen2_5vl",
        builder="mistralrs_plugins.models.qwen2_5vl.model:Qwen2_5VLForConditionalGeneration",
        processor="mistralrs_plugins.models.qwen2vl.processor:Qwen2VLProcessor",
        kind_of_model="vision",
        hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
        model_types=("qwen2_5_vl",),
        description="Qwen2.5-VL (window-attention ViT with 2-D rotary; qwen2 language model with M-RoPE)",
    ))
