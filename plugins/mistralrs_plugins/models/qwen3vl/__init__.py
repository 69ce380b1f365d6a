"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): a ViT with learned resampled positions, 2-D
rotary and DeepStack features, the qwen3 text architecture with interleaved M-RoPE as the
language model. Registration only: the model lives in `.model`, the vision tower in `.vision`;
the input processor is Qwen2-VL's."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen3vl",
        builder="mistralrs_plugins.models.qwen3vl.model:Qwen3VLForConditionalGeneration",
        processor="mistralrs_plugins.models.qwen2vl.processor:Qwen2VLProcessor",
        kind_of_model="vision",
        hf_architectures=("Qwen3VLForConditionalGeneration",),
        model_types=("qwen3_vl",),
        description="Qwen3-VL (ViT with DeepStack features; qwen3 language model with interleaved M-RoPE)",
    ))
