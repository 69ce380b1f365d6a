"""Gemma 3 with images (``Gemma3ForConditionalGeneration``): a SigLIP tower, its last hidden
state average-pooled to ``mm_tokens_per_image`` tokens, RMS-normed and projected by
``mm_input_projection_weight`` into the Gemma 3 text model, where those embeddings replace the
image soft tokens. As transformers does in prefill, the tokens of one image attend to each other
in both directions (the attention batch's bidirectional ranges: each consecutive run of image
tokens), within the sliding window on sliding layers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.attention import consecutive_runs
from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import _ctx_device, _ctx_registry
from mistralrs.nn.norm import RMSNorm
from mistralrs_plugins.models.gemma3.siglip import SiglipVisionModel
from mistralrs_plugins.models.llava.model import VisionLanguageModel, text_model

# transformers 5 saves "language_model.model." / "vision_tower." (the tower without its
# "vision_model." level); hub checkpoints have it, and in-memory names nest under "model.".
_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
)


def with_tied_text(config: dict, default: bool) -> dict:
    """`config` whose text_config ties the head as transformers decides for a vision-language
    model: by the top-level ``tie_word_embeddings`` (else the text config's, else `default`)."""
    text = dict(config.get("text_config") or {})
    tie = config.get("tie_word_embeddings")
    if tie is None:
        tie = text.get("tie_word_embeddings")
    text["tie_word_embeddings"] = default if tie is None else bool(tie)
    return {**config, "text_config": text}


class Gemma3Projector(nn.Module):
    def __init__(self, config: dict, device: Any = None, registry: Any = None) -> None:
        super().__init__()
        vision, text = config["vision_config"], config["text_config"]
        vh = int(vision["hidden_size"])
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vh, int(text["hidden_size"])), requires_grad=False)
        self.mm_soft_emb_norm = RMSNorm(vh, float(vision.get("layer_norm_eps", 1e-6)), add_unit_offset=True,
                                        device=device, registry=registry)
        self.patches_per_side = int(vision["image_size"]) // int(vision["patch_size"])
        tokens = int(config.get("mm_tokens_per_image", 256))
        self.tokens_per_side = int(tokens ** 0.5)
        if self.tokens_per_side ** 2 != tokens or self.patches_per_side % self.tokens_per_side:
            raise ModelLoadError(f"config.json: mm_tokens_per_image {tokens} must be a square whose side divides the "
                                 f"{self.patches_per_side} patches per side")
        self.kernel = self.patches_per_side // self.tokens_per_side

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, _, h = feats.shape
        grid = feats.transpose(1, 2).reshape(b, h, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight.to(pooled.dtype)


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    renames: tuple[tuple[str, str], ...] = _RENAMES
    dropped = ("vision_tower.vision_model.head.",)  # SigLIP's pooling head: Gemma 3 does not use it

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        config = with_tied_text(config, default=True)
        self.config = config
        vision = dict(config.get("vision_config") or {})
        if vision.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
            raise ModelLoadError(f"config.json: vision_config model_type {vision.get('model_type')!r} is not "
                                 "supported for gemma3 (supported: siglip_vision_model)")
        config["text_config"].setdefault("model_type", "gemma3_text")
        self.vision_tower = SiglipVisionModel(vision)
        self.multi_modal_projector = Gemma3Projector(config, _ctx_device(ctx), _ctx_registry(ctx))
        self.language_model = text_model(config, ctx)

    # -- the multimodal contract ------------------------------------------------------------
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's embeddings [mm_tokens_per_image, text hidden]."""
        w = self.multi_modal_projector.mm_input_projection_weight
        pixels = item.data["pixel_values"].to(device=w.device)
        feats = self.vision_tower.vision_model(pixels.unsqueeze(0) if pixels.dim() == 3 else pixels)
        out = self.multi_modal_projector(feats).reshape(-1, w.shape[1])
        if out.shape[0] != item.length:
            raise ValueError(f"the image gives {out.shape[0]} embeddings for {item.length} placeholder tokens")
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any,
                mm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        lm = self.language_model
        if mm is None:
            return lm.forward(input_ids, positions, batch)
        index, values = mm
        embeds = lm.model.embed_tokens(input_ids.index_fill(0, index, 0))  # the image token may be past the vocab
        embeds = embeds.index_copy(0, index, values.to(embeds.dtype))
        batch = batch.with_bidirectional(consecutive_runs(index, batch.query_start_loc))
        return lm.model(input_ids, positions, batch, inputs_embeds=embeds)
