"""EmbeddingGemma: the Gemma 3 text stack attending bidirectionally — full layers see the
whole sentence, sliding layers the tokens less than ``sliding_window // 2 + 1`` away on either
side, as transformers' ``use_bidirectional_attention`` masks (its config halves the window so
the two-sided span matches the one-sided one it was trained from). Checkpoints are saved from
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
        bidirectional = bool(config.get("use_bidirectional_attention", True))
        config = {k: v for k, v in config.items() if k != "use_bidirectional_attention"}
        window = config.get("sliding_window")
        if bidirectional and isinstance(window, int) and window > 0:
            config["sliding_window"] = window // 2 + 1
        return super().settings(config)
