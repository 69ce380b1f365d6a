"""The Qwen2-VL input processor (also Qwen2.5-VL's and Qwen3-VL's), as transformers'
``Qwen2VLProcessor`` with ``Qwen2VLImageProcessor``: each image resized (bicubic) to the
nearest multiple of patch_size * merge_size on each side with its pixel count kept within
[min_pixels, max_pixels] (``smart_resize``), scaled and normalized, duplicated over
temporal_patch_size frames and cut into patches flattened in merge-block order
([grid_h * grid_w, C * T * P * P]); each ``<|image_pad|>`` in the prompt expanded to
grid_h * grid_w / merge_size² tokens. Each image's tokens get M-RoPE positions (t, h, w) over its
merged grid, and the text after it starts max(h, w) positions later (`MmItem.positions`,
`MmItem.position_span`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mistralrs.errors import InvalidRequest, ModelLoadError
from mistralrs.multimodal.inputs import MmItem

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) divisible by `factor`, pixels within [min_pixels, max_pixels], aspect
    ratio kept as closely as possible (transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequest(f"an image of {width}x{height} is too elongated (aspect ratio over 200)", "messages")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLImageProcessor:
    """A PIL RGB image -> (pixel patches float32 [grid_h * grid_w, C * T * P * P], (1, grid_h, grid_w))."""

    def __init__(self, cfg: dict[str, Any], vision: dict[str, Any]) -> None:
        size = cfg.get("size") or {}
        # top-level min/max_pixels win over size (transformers); some hub files spell size's keys so
        self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56)
        self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
                              or 28 * 28 * 1280)
        self.patch = int(cfg.get("patch_size") or vision.get("patch_size", 14))
        self.temporal = int(cfg.get("temporal_patch_size") or vision.get("temporal_patch_size", 2))
        self.merge = int(cfg.get("merge_size") or vision.get("spatial_merge_size", 2))
        self.do_resize = cfg.get("do_resize", True)
        self.scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        self.normalize = cfg.get("do_normalize", True)
        self.mean = tuple(cfg.get("image_mean") or CLIP_MEAN)
        self.std = tuple(cfg.get("image_std") or CLIP_STD)
        self.resample = int(cfg.get("resample", 3))  # PIL bicubic

    def __call__(self, image: Any) -> tuple[Any, tuple[int, int, int]]:
        import numpy as np
        import torch

        img = image
        if self.do_resize:
            h, w = smart_resize(img.height, img.width, self.patch * self.merge, self.min_pixels, self.max_pixels)
            if (w, h) != img.size:
                img = img.resize((w, h), resample=self.resample)
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # [C, H, W]
        if self.scale is not None:
            x = (arr.astype(np.float64) * self.scale).astype(np.float32)  # transformers' rescale
        else:
            x = arr.astype(np.float32)
        if self.normalize:
            mean, std = np.asarray(self.mean, dtype=np.float32), np.asarray(self.std, dtype=np.float32)
            x = ((x.T - mean) / std).T
        c, height, width = x.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = height // p, width // p
        patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh, gw, mh, mw, C, ph, pw
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        flat = np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32)
        return torch.from_numpy(flat), (1, gh, gw)


def mrope_offsets(grid: tuple[int, int, int], merge: int) -> tuple[Any, int]:
    """(positions [3, tokens] of an image's merged grid relative to its first token's position,
    the positions it spans): t, h, w indices in row-major (t, h, w) order, as transformers'
    ``get_vision_position_ids``; the text after it starts max(h, w) later."""
    import torch

    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1), max(h, w)


class Qwen2VLProcessor:
    def __init__(self, model_dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
        root = Path(model_dir)
        proc = _read(root / "processor_config.json")
        # transformers 5 keeps the image processor's settings in processor_config.json
        pre = _read(root / "preprocessor_config.json") or dict(proc.get("image_processor") or {})
        self.image_processor = Qwen2VLImageProcessor(pre, dict(config.get("vision_config") or {}))
        self.tokenizer = tokenizer
        self.image_token = "<|image_pad|>"
        token_id = config.get("image_token_id")
        self.image_token_id = int(token_id) if token_id is not None else tokenizer.token_to_id(self.image_token)
        if self.image_token_id is None:
            raise ModelLoadError(f"{root}: the tokenizer has no {self.image_token!r} token for images")
        self.max_images = None

    def process(self, prompt: str, images: list[Any]) -> tuple[list[int], tuple[MmItem, ...]]:
        """Token ids with each image's placeholder expanded, and one MmItem per image."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise InvalidRequest(f"the prompt has {len(slots)} image placeholders for {len(images)} images; the chat "
                                 "template places one per image part", "messages")
        merge = self.image_processor.merge
        out: list[int] = []
        items = []
        prev = 0
        for slot, image in zip(slots, images):
            out.extend(ids[prev:slot])
            pixels, grid = self.image_processor(image.image)
            length = grid[0] * grid[1] * grid[2] // (merge * merge)
            positions, span = mrope_offsets(grid, merge)
            items.append(MmItem(offset=len(out), length=length, key=image.digest,
                                data={"pixel_values": pixels, "grid_thw": grid},
                                positions=positions, position_span=span))
            out.extend([self.image_token_id] * length)
            prev = slot + 1
        out.extend(ids[prev:])
        return out, tuple(items)
