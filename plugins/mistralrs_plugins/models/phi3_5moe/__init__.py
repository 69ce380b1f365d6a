"""Phi-3.5-MoE (sparsemixer top-2 routing, LayerNorm, biased attention and head). Registration
only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="phi3.5moe",
        builder="mistralrs_plugins.models.phi3_5moe.model:PhiMoEForCausalLM",
        # the Hub's config.json says PhiMoEForCausalLM; transformers names the class PhimoeForCausalLM
        hf_architectures=("PhiMoEForCausalLM", "PhimoeForCausalLM"),
        model_types=("phimoe",),
        gguf_architectures=("phimoe",),
        gguf_converter="mistralrs_plugins.models.phi3_5moe.gguf:convert",
        description="Phi-3.5-MoE (16 experts, sparsemixer top-2 routing, LayerNorm, longrope with mscale)",
    ))
