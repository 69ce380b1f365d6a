"""RoBERTa and XLM-RoBERTa encoders as embedding models (BGE-M3, multilingual E5, paraphrase
multilingual sentence-transformers models). Registration only: the model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="roberta",
        builder="mistralrs_plugins.models.roberta.model:RobertaModel",
        kind_of_model="embedding",
        hf_architectures=("XLMRobertaModel", "RobertaModel", "XLMRobertaForMaskedLM", "RobertaForMaskedLM"),
        model_types=("xlm-roberta", "roberta"),
        description="RoBERTa / XLM-RoBERTa encoder (BERT layers; positions counted from the padding id + 1)",
    ))
