"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.x, Pixtral-style): the
Pixtral encoder on each image at its own size, features from ``vision_feature_layer`` (-1 by
default; a list concatenates several), RMS-normed, merged 2x2 (``spatial_merge_size``) by the
patch merger, projected by ``linear_1 -> act -> linear_2`` into the language model (the
registered text architecture ``text_config`` names, Mistral by default). An image's MmItem spans
its ``[IMG]``, ``[IMG_BREAK]`` and ``[IMG_END]`` tokens; the ``[IMG]`` slots get the features in
row-major order, the others their own token embeddings, as transformers leaves them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.activation import get_activation
from mistralrs.nn.decoder import _ctx_device, _ctx_registry
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import RMSNorm
from mistralrs_plugins.models.gemma3.vision import with_tied_text
from mistralrs_plugins.models.llava.model import VisionLanguageModel, text_model
from mistralrs_plugins.models.mistral3.pixtral import PixtralVisionModel

_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)


class PatchMerger(nn.Module):
    """Each m x m block of patch features (m = spatial_merge_size) concatenated, as
    ``F.unfold`` lays them out, and projected back to the vision width."""

    def __init__(self, hidden: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = Linear(hidden * merge * merge, hidden, bias=False)

    def forward(self, feats: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        d, m = feats.shape[-1], self.merge
        grid = feats.view(rows, cols, d).permute(2, 0, 1).unsqueeze(0)
        merged = F.unfold(grid, kernel_size=m, stride=m).view(d * m * m, -1).t()
        return self.merging_layer(merged)


class Mistral3Projector(nn.Module):
    def __init__(self, config: dict, n_layers: int, device: Any = None, registry: Any = None) -> None:
        super().__init__()
        vh, th = int(config["vision_config"]["hidden_size"]), int(config["text_config"]["hidden_size"])
        bias = bool(config.get("multimodal_projector_bias", False))
        self.norm = RMSNorm(vh, float(config["text_config"].get("rms_norm_eps", 1e-6)), device=device, registry=registry)
        self.patch_merger = PatchMerger(vh, int(config.get("spatial_merge_size", 2)))
        self.linear_1 = Linear(vh * n_layers, th, bias=bias)
        self.act = get_activation(str(config.get("projector_hidden_act", "gelu")))
        self.linear_2 = Linear(th, th, bias=bias)

    def forward(self, feats: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(feats), rows, cols))))


class Mistral3ForConditionalGeneration(VisionLanguageModel):
    renames: tuple[tuple[str, str], ...] = _RENAMES

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        config = with_tied_text(config, default=True)
        self.config = config
        vision = dict(config.get("vision_config") or {})
        if vision.get("model_type", "pixtral") != "pixtral":
            raise ModelLoadError(f"config.json: vision_config model_type {vision.get('model_type')!r} is not "
                                 "supported for mistral3 (supported: pixtral)")
        config["text_config"].setdefault("model_type", "mistral")
        self.vision_tower = PixtralVisionModel(vision)
        layer = config.get("vision_feature_layer", -1)
        self.feature_layers = [int(x) for x in layer] if isinstance(layer, (list, tuple)) else [int(layer)]
        self.multi_modal_projector = Mistral3Projector(config, len(self.feature_layers), _ctx_device(ctx),
                                                       _ctx_registry(ctx))
        self.image_token_id = int(config.get("image_token_index", config.get("image_token_id", 10)))
        self.language_model = text_model(config, ctx)

    # -- the multimodal contract ------------------------------------------------------------
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's span [rows * (cols + 1), text hidden]: features at its [IMG] tokens."""
        ids = item.data["input_ids"].to(device=self.vision_tower.patch_conv.weight.device)  # (linears may be quantized)
        n_layers = len(self.vision_tower.transformer.layers)
        wanted = [i if i >= 0 else n_layers + 1 + i for i in self.feature_layers]
        states = self.vision_tower(item.data["pixel_values"].to(ids.device), upto=max(wanted))
        rows, cols = item.data["grid"]
        m = self.multi_modal_projector.patch_merger.merge
        feats = self.multi_modal_projector(torch.cat([states[i] for i in wanted], dim=-1), rows * m, cols * m)
        out = self.language_model.model.embed_tokens(ids)
        slots = ids == self.image_token_id
        if int(slots.sum()) != feats.shape[0] or out.shape[0] != item.length:
            raise ValueError(f"the image gives {feats.shape[0]} features for {int(slots.sum())} [IMG] tokens")
        return out.masked_scatter(slots[:, None], feats.to(out.dtype))
