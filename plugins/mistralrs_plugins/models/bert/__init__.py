"""BERT-family encoders as embedding models (BertModel: all-MiniLM, BGE, E5, GTE-style
sentence-transformers checkpoints). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="bert",
        builder="mistralrs_plugins.models.bert.model:BertModel",
        kind_of_model="embedding",
        hf_architectures=("BertModel", "BertForMaskedLM", "BertForPreTraining"),
        model_types=("bert",),
        description="BERT encoder (absolute positions, token types, GELU, post-norm) for sentence embeddings",
    ))
