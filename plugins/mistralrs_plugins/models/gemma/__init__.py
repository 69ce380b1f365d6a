"""Gemma (1, 1.1, CodeGemma). Registration only: the torch model lives in `.model` and is
imported when a model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="gemma",
        builder="mistralrs_plugins.models.gemma.model:GemmaForCausalLM",
        hf_architectures=("GemmaForCausalLM",),
        model_types=("gemma",),
        gguf_architectures=("gemma",),
        gguf_converter="mistralrs_plugins.models.gemma.gguf:convert",
        description="Gemma 1 (RMSNorm (1 + w), sqrt(hidden)-scaled embeddings, GeGLU MLP, tied embeddings)",
    ))
