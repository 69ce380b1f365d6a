"""LLaVA: image features from a middle layer of the CLIP tower (``vision_feature_layer``, -2 by
default; a list concatenates several), the class token dropped with the ``default`` select
strategy, projected by ``linear_1 → act → linear_2`` into the language model's embedding space,
where they replace the ``<image>`` placeholder tokens. The language model is whatever text
architecture ``text_config`` names, built through the registry."""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear
from mistralrs_plugins.models.llava.clip import ClipVisionModel

# transformers 4.52+ in memory nests everything under "model."; hub checkpoints (and what
# transformers 5 saves) use "language_model.model.", "vision_tower." and the CLIP tower either
# with or without its "vision_model." level.
_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
)


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = Linear(vision_hidden, text_hidden, bias=bias)
        self.linear_2 = Linear(text_hidden, text_hidden, bias=bias)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def text_model(config: dict, ctx: Any) -> nn.Module:
    """The language model of a vision-language config: the registered text architecture of
    ``text_config`` (its ``architectures`` or ``model_type``)."""
    from mistralrs.loading import select_architecture
    from mistralrs.specs import resolve

    text = dict(config.get("text_config") or {})
    if not text.get("model_type"):
        raise ModelLoadError("config.json: text_config has no model_type; cannot build the language model")
    text.setdefault("architectures", None)
    registry = getattr(ctx, "registry", None)
    spec = select_architecture({k: v for k, v in text.items() if k != "architectures" or v}, registry=registry)
    sub_ctx = attrs.evolve(ctx, config=text, arch=spec) if ctx is not None else None
    return resolve(spec.builder)(text, sub_ctx)


def check_length(embeds: torch.Tensor, item: Any) -> torch.Tensor:
    if embeds.shape[0] != item.length:
        raise ValueError(f"the image gives {embeds.shape[0]} embeddings for {item.length} placeholder tokens")
    return embeds


class VisionLanguageModel(nn.Module):
    """What every vision-language model here shares: a registered text architecture as
    ``language_model``, image embeddings replacing their placeholder tokens' embeddings in
    `forward`, and checkpoint names mapped by the class's `renames` (regex, replacement) pairs
    before the language model maps its own. Subclasses build their encoder and implement
    `embed_multimodal`."""

    isq_scope = "language_model."  # --isq quantizes the language model only; the vision side stays float

    renames: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()  # checkpoint name prefixes the model does not use (after the renames)
    language_model: Any  # the registered text architecture's model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any,
                mm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        lm = self.language_model
        if mm is None:
            return lm.forward(input_ids, positions, batch)
        embeds = lm.model.embed_tokens(input_ids)
        index, values = mm
        embeds = embeds.index_copy(0, index, values.to(embeds.dtype))
        return lm.model(input_ids, positions, batch, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def kv_cache_shape(self) -> dict[str, int]:
        return self.language_model.kv_cache_shape()

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.language_model, "tied_embeddings", False))

    def map_checkpoint_name(self, name: str) -> str | None:
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        if name.startswith("language_model."):
            inner = self.language_model.map_checkpoint_name(name[len("language_model."):])
            return None if inner is None else "language_model." + inner
        if name.endswith("position_ids") or name.startswith(self.dropped):
            return None
        return name


class LlavaForConditionalGeneration(VisionLanguageModel):
    renames: tuple[tuple[str, str], ...] = _RENAMES

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        self.config = config
        vision = dict(config.get("vision_config") or {})
        if vision.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ModelLoadError(f"config.json: vision_config model_type {vision.get('model_type')!r} is not "
                                 f"supported for {config.get('model_type', 'llava')} (supported: clip_vision_model)")
        self.vision_tower = ClipVisionModel(vision)
        self.language_model = text_model(config, ctx)
        layer = config.get("vision_feature_layer", -2)
        self.feature_layers = [int(x) for x in layer] if isinstance(layer, (list, tuple)) else [int(layer)]
        self.select_strategy = str(config.get("vision_feature_select_strategy", "default"))
        text_hidden = int(config["text_config"]["hidden_size"])
        self.multi_modal_projector = LlavaProjector(
            int(vision["hidden_size"]) * len(self.feature_layers), text_hidden,
            str(config.get("projector_hidden_act", "gelu")), bool(config.get("multimodal_projector_bias", True)))

    # -- the multimodal contract ------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] pixels -> projected features [images, tokens, text hidden]."""
        # the patch convolution is never quantized (ISQ replaces Linear weights), so it names the device
        pixels = pixels.to(self.vision_tower.vision_model.embeddings.patch_embedding.weight.device)
        n_layers = len(self.vision_tower.vision_model.encoder.layers)
        wanted = [i if i >= 0 else n_layers + 1 + i for i in self.feature_layers]
        states = self.vision_tower.vision_model(pixels.unsqueeze(0) if pixels.dim() == 3 else pixels,
                                                upto=max(wanted))
        feats = torch.cat([states[i] for i in wanted], dim=-1)
        if self.select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's embeddings [tokens, text hidden]."""
        out = self.image_features(item.data["pixel_values"])
        return check_length(out.reshape(-1, out.shape[-1]), item)
