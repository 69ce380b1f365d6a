"""LLaVA-NeXT: LLaVA's tower and projector (`llava.model`) run on the base view and the tiles of
an image; the tiles' features are laid out as one grid over the best-fitting resolution, the
rows and columns that only cover padding are cut away (``unpad_image``), each feature row ends
with the learned ``image_newline``, and the base view's features come first: transformers'
``pack_image_features`` for one image."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs_plugins.models.llava.model import _RENAMES, LlavaForConditionalGeneration, check_length
from mistralrs_plugins.models.llava_next.processor import select_best_resolution, unpadded_grid


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    renames = ((r"^model\.image_newline$", "image_newline"), *_RENAMES)

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.pinpoints = [tuple(int(v) for v in p) for p in config.get("image_grid_pinpoints") or []]
        if not self.pinpoints:
            raise ModelLoadError("config.json: llava_next needs image_grid_pinpoints")
        self.image_newline = nn.Parameter(torch.empty(int(config["text_config"]["hidden_size"])),
                                          requires_grad=False)

    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's embeddings: base view, then the unpadded tile grid with a newline per row."""
        feats = self.image_features(item.data["pixel_values"])  # [1 + tiles, side * side, hidden]
        base, tiles = feats[0], feats[1:]
        newline = self.image_newline.to(feats.dtype)
        if tiles.shape[0] == 0:
            return check_length(torch.cat([base, newline[None]]), item)
        vision = self.config["vision_config"]
        size = int(vision["image_size"])
        side = size // int(vision["patch_size"])
        height, width = item.data["image_size"]
        best_h, best_w = select_best_resolution((height, width), self.pinpoints)
        rows, cols = best_h // size, best_w // size
        if rows * cols != tiles.shape[0]:
            raise ValueError(f"the image has {tiles.shape[0]} tiles for a {rows}x{cols} grid")
        grid = tiles.reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        top, bottom, left, right = unpadded_grid((height, width), grid.shape[1], grid.shape[2])
        grid = grid[:, top:bottom, left:right]
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=-1)
        return check_length(torch.cat([base, grid.flatten(1, 2).transpose(0, 1)]), item)
