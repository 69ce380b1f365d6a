"""Qwen3 dense text models. Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen3",
        builder="mistralrs_plugins.models.qwen3.model:Qwen3ForCausalLM",
        hf_architectures=("Qwen3ForCausalLM",),
        model_types=("qwen3",),
        gguf_architectures=("qwen3",),
        gguf_converter="mistralrs_plugins.models.qwen3.gguf:convert",
        description="Qwen3 dense (per-head QK RMSNorm, explicit head_dim)",
    ))
