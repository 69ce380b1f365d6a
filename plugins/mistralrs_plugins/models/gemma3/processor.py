"""Gemma 3's input processor, as transformers' ``Gemma3Processor`` with the PIL
``Gemma3ImageProcessor``: each image resized to the tower's square (bilinear, no crop), scaled
and normalized (mean = std = 0.5 by default); each ``<start_of_image>`` the chat template puts
in the prompt becomes ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` image soft tokens +
``<end_of_image>\\n\\n`` before tokenizing. Pan-and-scan crops are off, as transformers' default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mistralrs.errors import InvalidRequest, ModelLoadError
from mistralrs.multimodal.inputs import MmItem
from mistralrs_plugins.models.llava.processor import ClipImageProcessor, _read


def token_text(tokenizer: Any, token_id: Any, what: str, where: Path) -> str:
    text = tokenizer.id_to_token(int(token_id)) if token_id is not None else None
    if not text:
        raise ModelLoadError(f"{where}: config.json's {what} ({token_id}) is not a token of the tokenizer")
    return str(text)


def expand_placeholders(prompt: str, placeholder: str, expansions: list[str]) -> str:
    """`prompt` with its i-th `placeholder` replaced by expansions[i] (one per image)."""
    pieces = prompt.split(placeholder)
    if len(pieces) - 1 != len(expansions):
        raise InvalidRequest(f"the prompt has {len(pieces) - 1} image placeholders for {len(expansions)} images; the "
                             "chat template places one per image part", "messages")
    out = [pieces[0]]
    for expansion, piece in zip(expansions, pieces[1:]):
        out += [expansion, piece]
    return "".join(out)


def image_items(ids: list[int], images: list[Any], data: list[dict[str, Any]],
                spans: list[list[int]]) -> tuple[MmItem, ...]:
    """One MmItem per image over its expanded tokens `spans[i]`, found in order in `ids`."""
    items = []
    pos = 0
    for image, tensors, span in zip(images, data, spans):
        while pos < len(ids) and ids[pos] != span[0]:
            pos += 1
        if ids[pos:pos + len(span)] != span:
            raise InvalidRequest("the prompt's text around an image placeholder merged with the image tokens; "
                                 "separate the image from the text", "messages")
        items.append(MmItem(offset=pos, length=len(span), key=image.digest, data=tensors))
        pos += len(span)
    return tuple(items)


class Gemma3Processor:
    def __init__(self, model_dir: Path, config: dict[str, Any], tokenizer: Any) -> None:
        root = Path(model_dir)
        proc = _read(root / "processor_config.json")
        pre = _read(root / "preprocessor_config.json") or dict(proc.get("image_processor") or {})
        if pre.get("do_pan_and_scan"):
            raise ModelLoadError(f"{root}: pan-and-scan (do_pan_and_scan) is not supported; turn it off")
        vision = config.get("vision_config") or {}
        side = int(vision.get("image_size", 896))
        pre = {"size": {"height": side, "width": side}, "resample": 2, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3, **pre, "do_center_crop": False}
        self.image_processor = ClipImageProcessor(pre, side)
        self.tokenizer = tokenizer
        self.boi = token_text(tokenizer, config.get("boi_token_index", 255_999), "boi_token_index", root)
        eoi = token_text(tokenizer, config.get("eoi_token_index", 256_000), "eoi_token_index", root)
        self.image_token_id = int(config.get("image_token_index", config.get("image_token_id", 262_144)))
        soft = token_text(tokenizer, self.image_token_id, "image_token_index", root)
        self.tokens_per_image = int(proc.get("image_seq_length") or config.get("mm_tokens_per_image", 256))
        self.expansion = f"\n\n{self.boi}{soft * self.tokens_per_image}{eoi}\n\n"
        self.max_images = None

    def process(self, prompt: str, images: list[Any]) -> tuple[list[int], tuple[MmItem, ...]]:
        """Token ids with each image's placeholder expanded, and one MmItem per image."""
        text = expand_placeholders(prompt, self.boi, [self.expansion] * len(images))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        data = [{"pixel_values": self.image_processor(image.image)} for image in images]
        span = [self.image_token_id] * self.tokens_per_image
        return ids, image_items(ids, images, data, [span] * len(images))
