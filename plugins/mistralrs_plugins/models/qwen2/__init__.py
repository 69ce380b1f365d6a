"""Qwen2 / Qwen2.5 text models. Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen2",
        builder="mistralrs_plugins.models.qwen2.model:Qwen2ForCausalLM",
        hf_architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        gguf_architectures=("qwen2",),
        gguf_converter="mistralrs_plugins.models.qwen2.gguf:convert",
        description="Qwen2 / Qwen2.5 (q/k/v biases, optional sliding window on layers >= max_window_layers)",
    ))
