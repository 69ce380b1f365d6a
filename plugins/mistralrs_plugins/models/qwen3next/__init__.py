"""Qwen3-Next (Qwen3NextForCausalLM: Gated DeltaNet layers on the recurrent-state cache, gated
attention every few layers, MoE with a gated shared expert). Registration only: the torch model
lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen3next",
        builder="mistralrs_plugins.models.qwen3next.model:Qwen3NextForCausalLM",
        hf_architectures=("Qwen3NextForCausalLM",),
        model_types=("qwen3_next",),
        gguf_architectures=("qwen3next",),
        gguf_converter="mistralrs_plugins.models.qwen3next.gguf:convert",
        description="Qwen3-Next (Gated DeltaNet + gated attention hybrid, top-k MoE with a gated shared expert)",
    ))
