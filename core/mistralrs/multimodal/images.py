"""Image sources as mistral.rs accepts them — ``data:`` URLs, ``http(s)`` URLs (fetched with a
size cap and a timeout) and local file paths — decoded with Pillow to RGB. PNG, JPEG, BMP, GIF
(its first frame) and WebP; anything else, a corrupt file, an unreachable or oversized URL is an
`InvalidRequest` naming the problem."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

from mistralrs.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
MAX_IMAGE_BYTES = int(os.environ.get("MISTRALRS_MAX_IMAGE_BYTES", 20 * 1024 * 1024))
FETCH_TIMEOUT = 10.0
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)


@attrs.frozen(eq=False)
class ImageInput:
    image: Any  # PIL.Image.Image, RGB
    digest: str  # sha256 of the decoded pixels and size: the prefix cache keys image tokens on it
    source: str  # for error messages

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _short(source: str) -> str:
    return source if len(source) <= 60 else source[:40] + "..." + source[-12:]


def _fetch(url: str, param: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "mistralrs", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp:  # noqa: S310 - http(s) only
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_IMAGE_BYTES:
                raise InvalidRequest(f"the image at {_short(url)} is {int(length)} bytes, over the "
                                     f"{MAX_IMAGE_BYTES}-byte limit", param)
            data = resp.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InvalidRequest(f"could not fetch the image at {_short(url)} ({reason})", param) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequest(f"the image at {_short(url)} is over the {MAX_IMAGE_BYTES}-byte limit", param)
    return data


def read_source(source: str, param: str = "messages") -> bytes:
    """The encoded image bytes of a source."""
    if not isinstance(source, str) or not source.strip():
        raise InvalidRequest("an image part needs a URL: a data: URL, an http(s) URL or a file path", param)
    source = source.strip()
    if source.startswith("data:"):
        head, sep, payload = source.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequest("an image data: URL must be base64 (data:image/png;base64,...)", param)
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidRequest("the image data: URL is not valid base64", param) from None
        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidRequest(f"the image is over the {MAX_IMAGE_BYTES}-byte limit", param)
        return data
    if source.startswith(("http://", "https://")):
        return _fetch(source, param)
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"image {_short(source)} is neither a data: URL, an http(s) URL nor an existing file", param)
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InvalidRequest(f"image file {path} is over the {MAX_IMAGE_BYTES}-byte limit", param)
    return path.read_bytes()


def decode_image(data: bytes, source: str = "image", param: str = "messages") -> ImageInput:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        from mistralrs.errors import ConfigError

        raise ConfigError("image input needs Pillow: pip install 'mistralrs[vision]'") from None

    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in FORMATS:
            raise InvalidRequest(f"{_short(source)}: image format {fmt} is not supported "
                                 f"(supported: {', '.join(FORMATS)})", param)
        if img.width * img.height > MAX_PIXELS:
            raise InvalidRequest(f"{_short(source)}: {img.width}x{img.height} is too many pixels", param)
        img.seek(0)  # GIF: the first frame
        rgb = img.convert("RGB")
        rgb.load()
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"{_short(source)} is not a readable image ({type(exc).__name__}); send a PNG, JPEG, "
                             "BMP, GIF or WebP", param) from None
    digest = hashlib.sha256(rgb.tobytes() + f"{rgb.size}".encode()).hexdigest()
    return ImageInput(rgb, digest, source)


def load_image(source: str, param: str = "messages") -> ImageInput:
    return decode_image(read_source(source, param), source, param)
