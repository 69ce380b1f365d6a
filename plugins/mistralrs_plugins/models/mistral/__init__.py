"""Mistral (7B v0.1 with its 4096-token sliding window, v0.2/v0.3, Nemo). Registration only:
the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="mistral",
        builder="mistralrs_plugins.models.mistral.model:MistralForCausalLM",
        hf_architectures=("MistralForCausalLM",),
        model_types=("mistral",),
        gguf_architectures=(),  # GGUF Mistral files say "llama"
        description="Mistral 7B / Nemo (GQA, sliding-window attention on every layer)",
    ))
