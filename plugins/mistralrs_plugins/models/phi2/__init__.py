"""Phi-1 / Phi-1.5 / Phi-2 (HF PhiForCausalLM). Registration only: the torch model lives in
`.model` and is imported when a model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="phi2",
        builder="mistralrs_plugins.models.phi2.model:PhiForCausalLM",
        hf_architectures=("PhiForCausalLM",),
        model_types=("phi",),
        gguf_architectures=("phi2",),
        gguf_converter="mistralrs_plugins.models.phi2.gguf:convert",
        description="Phi-1/1.5/2 (parallel attention + MLP from one LayerNorm, partial rotary, biases, "
                    "optional QK LayerNorm)",
    ))
