"""EmbeddingGemma: Gemma 3 text with bidirectional attention (``Gemma3TextModel``,
``use_bidirectional_attention``), served as an embedding model. Registration only."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="embeddinggemma",
        builder="mistralrs_plugins.models.embeddinggemma.model:EmbeddingGemma",
        kind_of_model="embedding",
        hf_architectures=("Gemma3TextModel",),
        model_types=("gemma3_text",),
        description="EmbeddingGemma (Gemma 3 text encoder, bidirectional attention, symmetric sliding windows)",
    ))
