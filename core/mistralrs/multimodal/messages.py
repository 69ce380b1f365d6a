"""Image parts of chat messages, for vision models: OpenAI's ``{"type": "image_url",
"image_url": {"url": ...}}`` (or a bare URL string), the Responses API's ``input_image`` and
``{"type": "image", "image": ...}``, in message order. Each becomes ``{"type": "image"}`` in the
message (what Hugging Face chat templates of vision models render as the image placeholder),
text parts stay ``{"type": "text", "text": ...}``, and a string content becomes one text part."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mistralrs.errors import InvalidRequest

IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def image_source(part: Mapping[str, Any], where: str) -> str:
    value = part.get(part["type"])
    if part["type"] == "input_image":
        value = part.get("image_url", value)
    if isinstance(value, Mapping):
        value = value.get("url")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{where} has an image part without a URL (image_url.url: a data: URL, an http(s) URL "
                             "or a file path)", "messages")
    return value


def pull_images(messages: Any) -> tuple[Any, list[str]]:
    """(messages with image parts as ``{"type": "image"}`` and every content a list of parts,
    the image sources in order). Messages that are not lists are returned as they are."""
    if not isinstance(messages, list):
        return messages, []
    sources: list[str] = []
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            out.append(m)
            continue
        msg = dict(m)
        content = msg.get("content")
        if isinstance(content, str):
            msg["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind in IMAGE_PART_TYPES:
                    sources.append(image_source(part, f"messages[{i}].content"))
                    parts.append({"type": "image"})
                elif kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    parts.append(part)  # normalize_messages names what is wrong with it
            msg["content"] = parts
        out.append(msg)
    return out, sources
