"""Mixtral (8x7B, 8x22B and other top-k sparse-MoE checkpoints with Mistral attention).
Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="mixtral",
        builder="mistralrs_plugins.models.mixtral.model:MixtralForCausalLM",
        hf_architectures=("MixtralForCausalLM",),
        model_types=("mixtral",),
        # GGUF Mixtral files say general.architecture "llama" (with llama.expert_count > 0); that
        # name belongs to the llama spec, so a GGUF loader must route on the expert count.
        gguf_architectures=(),
        description="Mixtral sparse MoE (top-k routed experts, GQA, optional sliding window)",
    ))
