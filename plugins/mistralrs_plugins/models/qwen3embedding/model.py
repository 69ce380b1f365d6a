"""Qwen3-Embedding: the Qwen3 stack, causal as trained; the last token's hidden state is the
embedding (the pooling comes from the model's sentence-transformers config). Checkpoints are
saved from ``Qwen3Model`` (no ``model.`` prefix, no LM head)."""

from __future__ import annotations

from typing import Any

from mistralrs_plugins.models.qwen3.model import Qwen3ForCausalLM


class Qwen3Embedding(Qwen3ForCausalLM):
    arch_name = "qwen3embedding"
    bidirectional = False
    matryoshka = True  # Qwen3-Embedding supports user-chosen output dimensions (MRL)
    checkpoint_name_map = ((r"^(?!model\.|lm_head\.)", "model."),)

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__({**config, "tie_word_embeddings": True}, ctx)  # no LM head: nothing reads logits
