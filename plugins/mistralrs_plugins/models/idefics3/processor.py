"""Idefics3's (and SmolVLM's) input processor, as transformers' ``Idefics3Processor`` with
``Idefics3ImageProcessor``: the image resized so its longest side is ``size.longest_edge``
(Lanczos), then up to multiples of the tile size (``max_image_size``) and cut into tiles, with
the whole image squashed to one tile as a global view after them; each view rescaled and
normalized. Each ``<image>`` in the prompt becomes, per tile,
``<fake_token_around_image><row_R_col_C>`` + ``image_seq_len`` × ``<image>`` (a newline after each
row), then ``\\n<fake_token_around_image><global-img>`` + the global view's tokens +
``<fake_token_around_image>``. Every view is its own `MmItem` (its run of ``<image>`` tokens),
keyed on the image's hash and the view's index."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mistralrs.errors import InvalidRequest, ModelLoadError
from mistralrs.multimodal.inputs import MmItem
from mistralrs_plugins.models.llava.processor import _read, to_tensor

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on a resized side
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


def _to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """The longest side to `max_len`, the other kept in proportion and made even."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _to_tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


class Idefics3ImageProcessor:
    """Idefics3ImageProcessor's steps on a PIL RGB image -> (views [n, 3, tile, tile], rows, cols);
    rows = cols = 0 when the image is not split (a single view)."""

    def __init__(self, cfg: dict[str, Any], tile_default: int) -> None:
        self.size = cfg.get("size") or {"longest_edge": 4 * tile_default}
        self.tile = int((cfg.get("max_image_size") or {}).get("longest_edge", tile_default))
        self.do_resize = cfg.get("do_resize", True)
        self.do_split = cfg.get("do_image_splitting", True)
        self.scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        self.mean = tuple(cfg.get("image_mean") or (0.5, 0.5, 0.5)) if cfg.get("do_normalize", True) else None
        self.std = tuple(cfg.get("image_std") or (0.5, 0.5, 0.5))
        self.resample = int(cfg.get("resample", 1))  # PIL Lanczos

    def _resize(self, img: Any, height: int, width: int) -> Any:
        return img.resize((width, height), resample=self.resample)

    def __call__(self, image: Any) -> tuple[Any, int, int]:
        import numpy as np
        import torch

        img, tile = image, self.tile
        if self.do_resize:
            w, h = img.size
            if "longest_edge" in self.size:
                h, w = _below(*_to_max_len(h, w, int(self.size["longest_edge"])), MAX_IMAGE_SIZE)
            else:
                h, w = int(self.size["height"]), int(self.size["width"])
            img = self._resize(img, h, w)
        rows = cols = 0
        if not self.do_split:
            views = [self._resize(img, tile, tile)]
        else:
            img = self._resize(img, *_to_tile_multiple(img.size[1], img.size[0], tile))
            w, h = img.size
            if h > tile or w > tile:
                rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
                arr = np.asarray(img, dtype=np.uint8)
                views = [arr[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
                views.append(self._resize(img, tile, tile))
            else:
                views = [img]
        pixels = torch.stack([to_tensor(np.asarray(v, dtype=np.uint8), self.scale, self.mean, self.std) for v in views])
        return pixels, rows, cols


class Idefics3Processor:
    def __init__(self, model_dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
        root = Path(model_dir)
        proc = _read(root / "processor_config.json")
        pre = _read(root / "preprocessor_config.json") or dict(proc.get("image_processor") or {})
        vision = config.get("vision_config") or {}
        size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 32))
        scale = int(config.get("scale_factor", 2))
        self.image_processor = Idefics3ImageProcessor(pre, size)
        self.image_seq_len = int(proc.get("image_seq_len") or (size // patch) ** 2 // scale ** 2)
        self.tokenizer = tokenizer
        self.image_token = "<image>"
        token_id = config.get("image_token_id")
        self.image_token_id = int(token_id) if token_id is not None else tokenizer.token_to_id(self.image_token)
        if self.image_token_id is None:
            raise ModelLoadError(f"{root}: the tokenizer has no {self.image_token!r} token for images")
        self.max_images = None

    def expansion(self, rows: int, cols: int) -> str:
        """What one ``<image>`` becomes for an image split into rows x cols tiles."""
        run = self.image_token * self.image_seq_len
        glob = f"{FAKE}{GLOBAL}{run}{FAKE}"
        if rows == 0 and cols == 0:
            return glob
        grid = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return grid + "\n" + glob

    def process(self, prompt: str, images: list[Any]) -> tuple[list[int], tuple[MmItem, ...]]:
        """Token ids with each image expanded into its tiles' tokens, and one MmItem per view."""
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise InvalidRequest(f"the prompt has {len(pieces) - 1} image placeholders for {len(images)} images; the "
                                 "chat template places one per image part", "messages")
        views: list[tuple[str, Any]] = []
        text = pieces[0]
        for image, piece in zip(images, pieces[1:]):
            pixels, rows, cols = self.image_processor(image.image)
            views += [(f"{image.digest}:{k}", pixels[k]) for k in range(pixels.shape[0])]
            text += self.expansion(rows, cols) + piece
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        runs: list[int] = []  # start of each run of image tokens
        for i, t in enumerate(ids):
            if t == self.image_token_id and (i == 0 or ids[i - 1] != self.image_token_id):
                runs.append(i)
        if len(runs) != len(views) or ids.count(self.image_token_id) != len(views) * self.image_seq_len or any(ids[s:s + self.image_seq_len] != [self.image_token_id] * self.image_seq_len
                                          for s in runs):
            raise InvalidRequest("the image placeholders do not tokenize into one run of image tokens per image "
                                 "tile; is <image> written in the prompt's text?", "messages")
        items = tuple(MmItem(offset=s, length=self.image_seq_len, key=key, data={"pixel_values": px})
                      for s, (key, px) in zip(runs, views))
        return ids, items
