"""Granite 4.0 hybrid (GraniteMoeHybridForCausalLM: Mamba-2 layers with their recurrent state
beside attention layers, MoE or dense). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="granitemoehybrid",
        builder="mistralrs_plugins.models.granitemoehybrid.model:GraniteMoeHybridForCausalLM",
        hf_architectures=("GraniteMoeHybridForCausalLM",),
        model_types=("granitemoehybrid",),
        gguf_architectures=("granitehybrid",),
        gguf_converter="mistralrs_plugins.models.granitemoehybrid.gguf:convert",
        description="Granite 4.0 hybrid (Mamba-2 + attention layers, top-k MoE or dense, shared MLP)",
    ))
