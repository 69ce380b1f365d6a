"""The UQFF container (layout 1.2.0, mistral.rs's `reference/uqff-format.md`): file names,
version entries, and safetensors files written without copying the tensors.

A UQFF export is a directory: ``<stem>-<N>.uqff`` shards (safetensors files; every shard starts
with the U32 scalars ``uqff.version.major/minor/patch``; each layer is a record of ``<key>.weight``
plus ``<key>.weight.<field>`` entries and the U8 family tag ``<key>.weight.format``; at most
10 GiB per shard), ``residual.safetensors`` (every tensor no record holds), the model's config and
tokenizer files, ``uqff_report.json`` and optionally a README model card.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

VERSION = (1, 2, 0)
VERSION_KEYS = ("uqff.version.major", "uqff.version.minor", "uqff.version.patch")
MAX_SHARD_BYTES = 10 * 1024**3  # mistral.rs MAX_UQFF_SIZE_BYTES: a soft cap per shard
RESIDUAL = "residual.safetensors"
REPORT = "uqff_report.json"
# Copied beside the shards so the directory loads on its own (mistral.rs's list).
ASSETS = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "modules.json",
          "chat_template.jinja", "processor_config.json", "preprocessor_config.json")
UNQUANT = 1  # the family tag of a float layer stored in a shard (UQFF >= 1.1)

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)\.uqff$")

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def shard_name(stem: str, index: int) -> str:
    return f"{stem}-{index}.uqff"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """(stem, index) of ``<stem>-<N>.uqff``; None for any other name."""
    m = _SHARD.match(name)
    return (m["stem"], int(m["index"])) if m else None


def producer_metadata() -> dict[str, str]:
    """The informational ``__metadata__`` of every shard and the residual file."""
    from mistralrs import __version__

    return {
        "uqff.producer": "mistralrs (Python)",
        "uqff.version": ".".join(map(str, VERSION)),
        "uqff.producer.mistralrs.version": __version__,
        "uqff.producer.mistralrs.git_revision": "unknown",
    }


def version_entries() -> list[tuple[str, torch.Tensor]]:
    return [(key, torch.tensor(v, dtype=torch.uint32)) for key, v in zip(VERSION_KEYS, VERSION)]


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """A safetensors file of `tensors` in the given order, each written straight from its memory
    (safetensors' own writer copies every tensor into one buffer first). Written to a temporary
    name and renamed, so a failure never leaves a half file under the real name. Returns bytes."""
    items = []
    header: dict[str, object] = {}
    offset = 0
    # Wider elements first (as safetensors orders them): every tensor's data stays aligned to its element size.
    for name, t in sorted(tensors, key=lambda item: -item[1].element_size()):
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        dtype = _DTYPES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        t = t.detach().to("cpu").contiguous()
        n = tensor_nbytes(t)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        items.append(t)
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)
    return 8 + len(raw) + offset
