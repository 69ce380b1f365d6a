"""LLaVA-NeXT's input processor, as transformers' ``LlavaNextProcessor`` with
``LlavaNextImageProcessor``: the image resized (aspect kept, bicubic) into the best-fitting
``image_grid_pinpoints`` resolution, centered on zero padding and cut into crop-sized tiles; a
base view (the whole image squashed to the tile size) first; every view then through CLIP's
resize, crop and normalization. Each ``<image>`` expands to the base view's features plus the
unpadded tile features and one newline per feature row."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs_plugins.models.llava.processor import LlavaProcessor, _read


def select_best_resolution(size: tuple[int, int], resolutions: list[Any]) -> tuple[int, int]:
    """The (height, width) of `resolutions` keeping most of an image of `size` (height, width),
    then wasting least: transformers' ``select_best_resolution``."""
    h0, w0 = size
    best: tuple[int, int] | None = None
    best_effective, best_waste = 0, float("inf")
    for height, width in resolutions:
        scale = min(width / w0, height / h0)
        effective = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(height), int(width)), effective, waste
    if best is None:
        raise ModelLoadError("image_grid_pinpoints is empty")
    return best


def unpadded_grid(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """The rows and columns of a [height, width] feature grid that hold the image (of `size`)
    rather than padding: (top, bottom, left, right), as transformers' ``unpad_image``."""
    h0, w0 = size
    if w0 / h0 > width / height:
        new_height = int(round(h0 * (width / w0), 7))
        pad = (height - new_height) // 2
        return pad, height - pad, 0, width
    new_width = int(round(w0 * (height / h0), 7))
    pad = (width - new_width) // 2
    return 0, height, pad, width - pad


class LlavaNextProcessor(LlavaProcessor):
    def __init__(self, model_dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
        super().__init__(model_dir, config, tokenizer)
        root = Path(model_dir)
        # (num_additional_image_tokens, when absent, counts CLIP's class token as LlavaProcessor's
        # settings do: transformers' LlavaNextProcessor default of 0 would miscount by one.)
        proc = _read(root / "processor_config.json")
        pre = _read(root / "preprocessor_config.json") or dict(proc.get("image_processor") or {})
        self.pinpoints = [tuple(int(v) for v in p) for p in
                          (pre.get("image_grid_pinpoints") or config.get("image_grid_pinpoints") or [])]
        if not self.pinpoints:
            raise ModelLoadError(f"{root}: no image_grid_pinpoints in the image processor config or config.json")
        vision = config.get("vision_config") or {}
        size = pre.get("size") or {"shortest_edge": int(vision.get("image_size", 336))}
        crop = pre.get("crop_size") or {}
        self.base_hw = (int(size["height"]), int(size["width"])) if "height" in size else \
            (int(size["shortest_edge"]), int(size["shortest_edge"]))
        self.tile = int(crop.get("height") or size.get("height") or size["shortest_edge"])

    def tiles(self, image: Any) -> list[Any]:
        """The base view and the grid's tiles of a PIL RGB image, as uint8 PIL images."""
        import numpy as np
        from PIL import Image

        w0, h0 = image.size
        th, tw = select_best_resolution((h0, w0), self.pinpoints)
        scale_w, scale_h = tw / w0, th / h0  # the products below round as transformers' do
        if scale_w < scale_h:
            nw, nh = tw, min(math.ceil(h0 * scale_w), th)
        else:
            nh, nw = th, min(math.ceil(w0 * scale_h), tw)
        resized = np.asarray(image.resize((nw, nh), resample=self.image_processor.resample), dtype=np.uint8)
        top, left = (th - nh) // 2, (tw - nw) // 2
        canvas = np.zeros((th, tw, 3), dtype=np.uint8)
        canvas[top:top + nh, left:left + nw] = resized
        t = self.tile
        views = [image.resize((self.base_hw[1], self.base_hw[0]), resample=self.image_processor.resample)]
        views += [Image.fromarray(canvas[i:i + t, j:j + t]) for i in range(0, th, t) for j in range(0, tw, t)]
        return views

    def num_tokens(self, size: tuple[int, int]) -> int:
        """Placeholder tokens for an image of `size` (height, width): transformers'
        ``LlavaNextProcessor._get_number_of_features``."""
        h, w = self.image_processor.output_size
        th, tw = select_best_resolution(size, self.pinpoints)
        ph, pw = h // self.patch, w // self.patch
        top, bottom, left, right = unpadded_grid(size, ph * (th // h), pw * (tw // w))
        rows, cols = bottom - top, right - left
        n = rows * cols + rows + ph * pw + self.extra
        return n - 1 if self.strategy == "default" else n

    def image_item(self, image: Any) -> tuple[int, dict[str, Any]]:
        import torch

        w, h = image.image.size
        pixels = torch.stack([self.image_processor(v) for v in self.tiles(image.image)])
        return self.num_tokens((h, w)), {"pixel_values": pixels, "image_size": (h, w)}
