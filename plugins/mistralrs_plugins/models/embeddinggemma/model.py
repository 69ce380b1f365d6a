"""EmbeddingGemma: the Gemma 3 text stack attending bidirectionally — full layers see the
whole sentence, sliding layers the tokens less than ``sliding_window`` away on either side, as
transformers' ``use_bidirectional_attention`` masks. Checkpoints are saved from
``Gemma3TextModel`` (no ``model.`` prefix, no LM head)."""

from __future__ import annotations

from typing import Any

from mistralrs.nn.decoder import DecoderSettings
from mistralrs_plugins.models.gemma3.model import Gemma3ForCausalLM


class EmbeddingGemma(Gemma3ForCausalLM):
    arch_name = "embeddinggemma"
    matryoshka = True  # trained with Matryoshka truncation to 512, 256 and 128 dimensions
    checkpoint_name_map = ((r"^(?!model\.|lm_head\.)", "model."),)

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__({**config, "tie_word_embeddings": True}, ctx)
        self.bidirectional = bool(config.get("use_bidirectional_attention", True))

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        # the causal-only check of the chat model does not apply: the engine masks bidirectionally
        return super().settings({k: v for k, v in config.items() if k != "use_bidirectional_attention"})
