"""Read the key/value metadata of a GGUF file into a plain dict (tests only).

`gguf.GGUFReader` builds a numpy view per string, which takes tens of seconds on a
262k-token vocabulary; this reads only the metadata section, and returns numeric arrays
as numpy arrays and string arrays as lists of str, in about a second.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_gguf_metadata"]

_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file (v2/v3): scalars as Python values, numeric
    arrays as numpy arrays (bool arrays as lists of bool), string arrays as lists of str."""
    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        text = data[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        return text

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype == _STRING:
                return [string() for _ in range(count)]
            if etype in _NUMPY:
                size = _SCALARS[etype][1]
                arr = np.frombuffer(data, dtype=_NUMPY[etype], count=count, offset=pos).copy()
                pos += size * count
                return [bool(x) for x in arr] if etype == 7 else arr
            return [value(etype) for _ in range(count)]
        fmt, size = _SCALARS[vtype]
        (out,) = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        meta[key] = value(vtype)
    return meta
