"""SmolLM3. Registration only: the torch model lives in `.model` and is imported when a
model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="smollm3",
        builder="mistralrs_plugins.models.smollm3.model:SmolLM3ForCausalLM",
        hf_architectures=("SmolLM3ForCausalLM",),
        model_types=("smollm3",),
        gguf_architectures=("smollm3",),
        gguf_converter="mistralrs_plugins.models.smollm3.gguf:convert",
        description="SmolLM3 (Llama layout with NoPE layers: no_rope_layers / no_rope_layer_interval)",
    ))
