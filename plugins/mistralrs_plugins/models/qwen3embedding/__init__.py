"""Qwen3-Embedding: a Qwen3 model with a sentence-transformers folder (last-token pooling),
served as an embedding model. Registration only."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen3embedding",
        builder="mistralrs_plugins.models.qwen3embedding.model:Qwen3Embedding",
        kind_of_model="embedding",
        hf_architectures=("Qwen3ForCausalLM", "Qwen3Model"),
        model_types=("qwen3",),
        description="Qwen3-Embedding (the causal Qwen3 stack; last-token pooling from its sentence-transformers config)",
    ))
