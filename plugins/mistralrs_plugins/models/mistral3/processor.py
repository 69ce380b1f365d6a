"""Mistral 3's input processor, as transformers' ``PixtralProcessor`` with the PIL
``PixtralImageProcessor``: each image keeps its aspect ratio, shrunk to fit ``longest_edge`` if
larger, then resized (bicubic) up to whole multiples of patch x spatial_merge_size, scaled and
normalized; each ``[IMG]`` the chat template puts in the prompt becomes rows of ``[IMG]`` tokens
(one per merged patch) each closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``. The image's
MmItem spans all of them: the model fills the ``[IMG]`` slots with image features and the
break/end slots with those tokens' own embeddings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mistralrs.errors import ModelLoadError
from mistralrs.multimodal.inputs import MmItem
from mistralrs_plugins.models.gemma3.processor import expand_placeholders, image_items
from mistralrs_plugins.models.llava.processor import CLIP_MEAN, CLIP_STD, ClipImageProcessor, _read


def pixtral_size(width: int, height: int, longest: int, patch: int) -> tuple[int, int]:
    """(width, height) after PixtralImageProcessor's resize: fit in longest x longest, then
    round each side up to a multiple of `patch`."""
    ratio = max(height / longest, width / longest)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((width - 1) // patch + 1) * patch, ((height - 1) // patch + 1) * patch


class Mistral3Processor:
    def __init__(self, model_dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
        root = Path(model_dir)
        proc = _read(root / "processor_config.json")
        pre = _read(root / "preprocessor_config.json") or dict(proc.get("image_processor") or {})
        vision = config.get("vision_config") or {}
        size = pre.get("size") or {}
        self.longest = int(size.get("longest_edge") or size.get("height") or 1024) if isinstance(size, dict) else int(size)
        self.patch = int(proc.get("patch_size") or vision.get("patch_size", 14)) * int(
            proc.get("spatial_merge_size") or config.get("spatial_merge_size", 2))
        self.resample = int(pre.get("resample", 3))
        self.normalize = ClipImageProcessor({"image_mean": CLIP_MEAN, "image_std": CLIP_STD, **pre,
                                             "do_resize": False, "do_center_crop": False}, self.patch)
        self.tokenizer = tokenizer
        names = {k: str(proc.get(k) or d) for k, d in (("image_token", "[IMG]"), ("image_break_token", "[IMG_BREAK]"),
                                                      ("image_end_token", "[IMG_END]"))}
        ids = {k: tokenizer.token_to_id(v) for k, v in names.items()}
        missing = [names[k] for k, v in ids.items() if v is None]
        if missing:
            raise ModelLoadError(f"{root}: the tokenizer has no {', '.join(missing)} token(s) for images")
        self.image_token = names["image_token"]
        self.texts = names
        self.ids = ids
        self.max_images = None

    def process(self, prompt: str, images: list[Any]) -> tuple[list[int], tuple[MmItem, ...]]:
        """Token ids with each image's placeholder expanded, and one MmItem per image."""
        expansions, spans, data = [], [], []
        for image in images:
            w, h = pixtral_size(*image.size, self.longest, self.patch)
            rows, cols = h // self.patch, w // self.patch
            t = self.texts
            expansions.append((t["image_token"] * cols + t["image_break_token"]) * (rows - 1)
                              + t["image_token"] * cols + t["image_end_token"])
            span = ([self.ids["image_token"]] * cols + [self.ids["image_break_token"]]) * rows
            span[-1] = self.ids["image_end_token"]
            spans.append(span)
            pixels = self.normalize(image.image.resize((w, h), resample=self.resample))
            data.append({"pixel_values": pixels, "input_ids": torch.tensor(span), "grid": (rows, cols)})
        text = expand_placeholders(prompt, self.image_token, expansions)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids, image_items(ids, images, data, spans)
