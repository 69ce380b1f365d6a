"""Phi-3 / Phi-3.5-mini / Phi-4 / Phi-4-mini (HF Phi3ForCausalLM). Registration only: the torch
model lives in `.model` and is imported when a model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="phi3",
        builder="mistralrs_plugins.models.phi3.model:Phi3ForCausalLM",
        hf_architectures=("Phi3ForCausalLM",),
        model_types=("phi3",),
        gguf_architectures=("phi3",),
        gguf_converter="mistralrs_plugins.models.phi3.gguf:convert",
        description="Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj, longrope, sliding window, "
                    "partial rotary, tied or untied embeddings)",
    ))
