"""LLaVA's input processor, as transformers' ``LlavaProcessor`` with ``CLIPImageProcessor``:
each image resized (shortest edge, bicubic), center-cropped, scaled to [0, 1] and normalized
with the checkpoint's mean and std; each ``<image>`` in the prompt expanded to as many
placeholder tokens as the tower gives features ((crop / patch)² + the class token, less one with
the ``default`` select strategy)."""

from __future__ import annotations

import json
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


def _size(value: Any, default: int) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return default, default


class ClipImageProcessor:
    """CLIPImageProcessor's steps on a PIL RGB image -> float32 tensor [3, H, W]."""

    def __init__(self, cfg: dict[str, Any], image_size: int) -> None:
        size = cfg.get("size", {"shortest_edge": image_size})
        self.shortest = size.get("shortest_edge") if isinstance(size, dict) else size
        self.resize_hw = (int(size["height"]), int(size["width"])) if isinstance(size, dict) and "height" in size else None
        self.crop = _size(cfg.get("crop_size"), image_size)
        self.do_resize = cfg.get("do_resize", True)
        self.do_crop = cfg.get("do_center_crop", True)
        self.scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        self.normalize = cfg.get("do_normalize", True)
        self.mean = tuple(cfg.get("image_mean") or CLIP_MEAN)
        self.std = tuple(cfg.get("image_std") or CLIP_STD)
        self.resample = int(cfg.get("resample", 3))  # PIL bicubic

    @property
    def output_size(self) -> tuple[int, int]:
        if self.do_crop:
            return self.crop
        return self.resize_hw or (int(self.shortest), int(self.shortest))

    def __call__(self, image: Any) -> Any:
        import numpy as np

        img = image
        if self.do_resize:
            if self.resize_hw is not None:
                h, w = self.resize_hw
            else:
                short = int(self.shortest)
                iw, ih = img.size
                if iw <= ih:
                    w, h = short, int(short * ih / iw)
                else:
                    h, w = short, int(short * iw / ih)
            img = img.resize((w, h), resample=self.resample)
        arr = np.asarray(img, dtype=np.uint8)
        if self.do_crop:
            ch, cw = self.crop
            h, w = arr.shape[:2]
            if h < ch or w < cw:  # padded with zeros, as transformers' center_crop does
                pad = np.zeros((max(h, ch), max(w, cw), 3), dtype=arr.dtype)
                top, left = (max(h, ch) - h) // 2, (max(w, cw) - w) // 2
                pad[top:top + h, left:left + w] = arr
                arr, h, w = pad, pad.shape[0], pad.shape[1]
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top:top + ch, left:left + cw]
        return to_tensor(arr, self.scale, self.mean if self.normalize else None, self.std)


def to_tensor(arr: Any, scale: float, mean: Any, std: Any) -> Any:
    """A [H, W, 3] uint8 array, rescaled and normalized as transformers does it (the product in
    float64, then float32; ``mean=None``: no normalization) -> float32 tensor [3, H, W]."""
    import numpy as np
    import torch

    x = (arr.astype(np.float64) * scale).astype(np.float32)
    if mean is not None:
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class LlavaProcessor:
    def __init__(self, model_dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
        root = Path(model_dir)
        proc = _read(root / "processor_config.json")
        # transformers 5 keeps the image processor's settings in processor_config.json
        pre = _read(root / "preprocessor_config.json") or dict(proc.get("image_processor") or {})
        vision = config.get("vision_config") or {}
        self.image_processor = ClipImageProcessor(pre, int(vision.get("image_size", 336)))
        self.tokenizer = tokenizer
        self.image_token = str(proc.get("image_token") or "<image>")
        token_id = config.get("image_token_id", config.get("image_token_index"))
        self.image_token_id = int(token_id) if token_id is not None else tokenizer.token_to_id(self.image_token)
        if self.image_token_id is None:
            raise ModelLoadError(f"{root}: the tokenizer has no {self.image_token!r} token for images")
        patch = int(proc.get("patch_size") or vision.get("patch_size", 14))
        h, w = self.image_processor.output_size
        extra = int(proc.get("num_additional_image_tokens", 1))
        strategy = proc.get("vision_feature_select_strategy") or config.get("vision_feature_select_strategy", "default")
        self.patch, self.strategy, self.extra = patch, strategy, extra
        self.tokens_per_image = (h // patch) * (w // patch) + extra - (1 if strategy == "default" else 0)
        self.max_images = None

    def image_item(self, image: Any) -> tuple[int, dict[str, Any]]:
        """(placeholder tokens, encoder inputs) of one image."""
        return self.tokens_per_image, {"pixel_values": self.image_processor(image.image)}

    def process(self, prompt: str, images: list[Any]) -> tuple[list[int], tuple[MmItem, ...]]:
        """Token ids with each image's placeholder expanded, and one MmItem per image."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise InvalidRequest(f"the prompt has {len(slots)} image placeholders for {len(images)} images; the chat "
                                 "template places one per image part", "messages")
        out: list[int] = []
        items = []
        prev = 0
        for slot, image in zip(slots, images):
            out.extend(ids[prev:slot])
            length, data = self.image_item(image)
            items.append(MmItem(offset=len(out), length=length, key=image.digest, data=data))
            out.extend([self.image_token_id] * length)
            prev = slot + 1
        out.extend(ids[prev:])
        return out, tuple(items)
