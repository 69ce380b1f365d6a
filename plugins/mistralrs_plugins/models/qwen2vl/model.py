"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): the Qwen2-VL vision transformer, whose merged
patch tokens replace the ``<|image_pad|>`` placeholders, and the registered ``qwen2`` text
architecture as the language model with multimodal rotary positions (M-RoPE: ``mrope_section``
splits each head's frequencies between temporal, height and width positions; the processor
gives each image's tokens their positions, `multimodal.inputs.rope_positions` lays them out).
`QwenVLBase` is what Qwen2.5-VL and Qwen3-VL share: config reading, the multimodal contract
and checkpoint names."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mistralrs_plugins.models.llava.model import VisionLanguageModel, text_model
from mistralrs_plugins.models.qwen2vl.vision import Qwen2VisionTransformer

# transformers 5 saves "model.visual.", "model.language_model." and "lm_head."; hub checkpoints
# saved by transformers 4 use "visual.", "model." (the language model) and "lm_head.".
_RENAMES = (
    (r"^model\.visual\.", "visual."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
)
_NOT_TEXT = ("vision_config", "text_config", "architectures", "model_type", "auto_map")


def text_config_of(config: dict, *, model_type: str, architecture: str, mrope_section: list[int],
                   mrope_interleaved: bool = False) -> dict:
    """The language model's config: ``text_config`` (transformers 5) over the top-level keys
    (flat hub configs), as the registered text architecture's config with M-RoPE parameters."""
    text = {k: v for k, v in config.items() if k not in _NOT_TEXT}
    text.update(config.get("text_config") or {})
    text["model_type"], text["architectures"] = model_type, [architecture]
    if config.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    params = dict(text.get(key) or {})
    params.setdefault("rope_theta", text.get("rope_theta", 1_000_000.0))
    params.setdefault("mrope_section", list(mrope_section))
    if mrope_interleaved:
        params["mrope_interleaved"] = True
    text[key] = params
    return text


class QwenVLBase(VisionLanguageModel):
    renames: tuple[tuple[str, str], ...] = _RENAMES
    text_model_type: ClassVar[str] = "qwen2"
    text_architecture: ClassVar[str] = "Qwen2ForCausalLM"
    default_mrope_section: ClassVar[list[int]] = [16, 24, 24]
    mrope_interleaved: ClassVar[bool] = False

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        self.config = config
        text = text_config_of(config, model_type=self.text_model_type, architecture=self.text_architecture,
                              mrope_section=self.default_mrope_section, mrope_interleaved=self.mrope_interleaved)
        self.visual = self.build_vision(dict(config.get("vision_config") or {}), int(text["hidden_size"]))
        self.language_model = text_model({**config, "text_config": text}, ctx)

    def build_vision(self, vision: dict, text_hidden: int) -> nn.Module:
        raise NotImplementedError

    # -- the multimodal contract ------------------------------------------------------------
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's embeddings [tokens, text hidden]."""
        out = self._encode(item)
        if out.shape[0] != item.length:
            raise ValueError(f"the image gives {out.shape[0]} embeddings for {item.length} placeholder tokens")
        return out

    def _encode(self, item: Any) -> torch.Tensor:
        w = self.visual.patch_embed.proj.weight
        return self.visual(item.data["pixel_values"].to(w.device), tuple(item.data["grid_thw"]))

    def _embeds(self, input_ids: torch.Tensor, mm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        if mm is None:
            return None
        embeds = self.language_model.model.embed_tokens(input_ids)
        index, values = mm
        return embeds.index_copy(0, index, values.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any,
                mm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.language_model.model(input_ids, positions, batch, inputs_embeds=self._embeds(input_ids, mm))


class Qwen2VLForConditionalGeneration(QwenVLBase):
    def build_vision(self, vision: dict, text_hidden: int) -> nn.Module:
        return Qwen2VisionTransformer(vision, int(vision.get("hidden_size", text_hidden)))
