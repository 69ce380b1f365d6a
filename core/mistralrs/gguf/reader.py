"""The GGUF container: header, metadata, tensor infos, and tensors as views of the file.

    gf = GgufFile.open(path)       # parses header + metadata + tensor infos (no tensor data read)
    gf.metadata["llama.block_count"], gf.tensors["blk.0.attn_q.weight"].ggml_type
    gf.tensor("token_embd.weight") # torch tensor viewing the (copy-on-write) mmap

Layout (little-endian; ggml's gguf.h): magic "GGUF", version u32 (2 or 3; version 1 used u32
counts and is refused), tensor count u64, metadata count u64, metadata key/value pairs, tensor
infos (name, n_dims u32, dims u64 — innermost first —, type u32, offset u64), padding to
``general.alignment`` (32), then the tensor data. Shapes here are torch order (dims reversed).

Metadata arrays are parsed with numpy for numbers and one pass over the bytes for strings, so
a 128k-token vocabulary costs well under a second. Every malformed file is a one-line
`ModelLoadError` naming the file: not a GGUF, truncated, big-endian, unsupported version,
unknown tensor type, tensor data out of bounds.

`GgufModel` joins the files of a split model (``-00001-of-0000N.gguf``, found from the first).
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from mistralrs.errors import ModelLoadError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# ggml type id: (name, elements per block, bytes per block) — ggml.h `enum ggml_type`.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# Types that are plain (unblocked) numbers: their tensors come out typed, not as block bytes.
PLAIN_TYPES = {0: "float32", 1: "float16", 30: "bfloat16", 24: "int8", 25: "int16", 26: "int32", 27: "int64",
               28: "float64"}

# Metadata value types: id -> (struct code, numpy dtype) for the fixed-size ones.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS: dict[int, tuple[str, str]] = {
    _UINT8: ("<B", "<u1"), _INT8: ("<b", "<i1"), _UINT16: ("<H", "<u2"), _INT16: ("<h", "<i2"),
    _UINT32: ("<I", "<u4"), _INT32: ("<i", "<i4"), _FLOAT32: ("<f", "<f4"), _BOOL: ("<?", "<u1"),
    _UINT64: ("<Q", "<u8"), _INT64: ("<q", "<i8"), _FLOAT64: ("<d", "<f8"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def type_name(ggml_type: int) -> str:
    entry = GGML_TYPES.get(ggml_type)
    return entry[0] if entry else f"type {ggml_type}"


def is_gguf(path: Path | str) -> bool:
    """Whether a file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@attrs.frozen
class GgufTensorInfo:
    """One tensor: torch-order `shape`, GGML type id, absolute byte offset and size in `path`."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int
    path: Path

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def is_plain(self) -> bool:
        """F32/F16/BF16/integers: values, not GGML blocks."""
        return self.ggml_type in PLAIN_TYPES

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the innermost dimension) of a block type."""
        _, bs, ts = GGML_TYPES[self.ggml_type]
        return self.shape[-1] // bs * ts


class _Cursor:
    """Sequential little-endian reads over the mapped file; running off its end is 'truncated'."""

    def __init__(self, buf: Any, path: Path, wide: bool, kind: str = "GGUF") -> None:
        self.buf, self.pos, self.path, self.wide, self.kind = buf, 0, path, wide, kind
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.path}: truncated {self.kind} file (it ends inside {what} at byte {self.pos} of {self.size}); "
                "download the file again"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def count(self, what: str) -> int:
        return self.u64(what) if self.wide else self.u32(what)

    def string(self, what: str) -> str:
        n = self.count(what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise ModelLoadError(f"{self.path}: metadata {what} has unknown value type {vtype}; the file is corrupt")
        code = scalar[0]
        size = struct.calcsize(code)
        self.need(size, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += size
        return v

    def array(self, what: str) -> Any:
        etype = self.u32(what)
        n = self.count(what)
        if etype == _STRING:
            return self.string_array(n, what)
        scalar = _SCALARS.get(etype)
        if scalar is not None:
            dtype = np.dtype(scalar[1])
            self.need(n * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
            self.pos += n * dtype.itemsize
            return arr.astype(bool) if etype == _BOOL else arr
        if etype == _ARRAY:
            return [self.array(what) for _ in range(n)]
        raise ModelLoadError(f"{self.path}: metadata {what} is an array of unknown type {etype}; the file is corrupt")

    def string_array(self, n: int, what: str) -> list[str]:
        # One pass: length prefix, slice. Strings are decoded in one join/split when none holds
        # the separator (vocabularies never hold NUL... but be safe and check).
        buf, pos, size = self.buf, self.pos, self.size
        lengths = []
        starts = []
        step = 8 if self.wide else 4
        unpack = (_U64 if self.wide else _U32).unpack_from
        for _ in range(n):
            if pos + step > size:
                self.pos = pos
                self.need(step, what)
            (length,) = unpack(buf, pos)
            pos += step
            if pos + length > size:
                self.pos = pos
                self.need(length, what)
            starts.append(pos)
            lengths.append(length)
            pos += length
        self.pos = pos
        mv = memoryview(buf)
        return [str(mv[s:s + length], "utf-8", "replace") for s, length in zip(starts, lengths)]


class GgufFile:
    """One parsed GGUF file. Tensor data is not read until `tensor()` is called."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], tensors: dict[str, GgufTensorInfo],
                 alignment: int, data_offset: int, mapping: mmap.mmap) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._mmap: mmap.mmap | None = mapping

    @classmethod
    def open(cls, path: Path | str) -> GgufFile:
        path = Path(path)
        mapping = map_file(path, "GGUF", "-f/--quantized-file")
        try:
            return cls._parse(path, mapping)
        except BaseException:
            mapping.close()
            raise

    @classmethod
    def _parse(cls, path: Path, buf: mmap.mmap) -> GgufFile:
        magic = bytes(buf[:4])
        if magic != MAGIC:
            if magic in (b"lmgg", b"fmgg", b"tjgg"):
                raise ModelLoadError(
                    f"{path}: a legacy GGML file, not GGUF; load it with --format ggml (or convert it with "
                    "llama.cpp's convert_llama_ggml_to_gguf.py)"
                )
            raise ModelLoadError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        if len(buf) < 8:
            raise ModelLoadError(f"{path}: truncated GGUF file (no version field); download the file again")
        (version,) = _U32.unpack_from(buf, 4)
        if version & 0xFFFF == 0 and (version >> 24) in (1, 2, 3):
            raise ModelLoadError(
                f"{path}: a big-endian GGUF file (version {version >> 24}); only little-endian files run here - "
                "use the little-endian build of this model"
            )
        if version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(
                f"{path}: GGUF version {version} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); "
                "re-convert the model with a current llama.cpp"
            )
        cur = _Cursor(buf, path, wide=True)
        cur.pos = 8
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        if n_tensors > len(buf) // 16 or n_kv > len(buf) // 12:
            raise ModelLoadError(
                f"{path}: truncated or corrupt GGUF file (its header claims {n_tensors} tensors and {n_kv} metadata "
                f"entries in {len(buf)} bytes); download the file again"
            )
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            vtype = cur.u32(f"metadata {key!r}")
            metadata[key] = cur.value(vtype, f"metadata {key!r}")
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = cur.string(f"tensor info {i}")
            n_dims = cur.u32(f"tensor {name!r}")
            if n_dims > 8:
                raise ModelLoadError(f"{path}: tensor {name!r} has {n_dims} dimensions; the file is corrupt")
            dims = [cur.u64(f"tensor {name!r}") for _ in range(n_dims)]
            ggml_type = cur.u32(f"tensor {name!r}")
            offset = cur.u64(f"tensor {name!r}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{path}: general.alignment {alignment!r} is not a power of two; the file is corrupt")
        data_offset = -(-cur.pos // alignment) * alignment
        tensors: dict[str, GgufTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            entry = GGML_TYPES.get(ggml_type)
            if entry is None:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has GGML type id {ggml_type}, which this version does not know; "
                    "update mistralrs or re-quantize the model to a common type"
                )
            tname, bs, ts = entry
            inner = shape[-1] if shape else 1
            if inner % bs:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} of type {tname} has a row of {inner} values, not a multiple of its "
                    f"block size {bs}; the file is corrupt"
                )
            n = 1
            for d in shape:
                n *= d
            nbytes = n // bs * ts
            start = data_offset + offset
            if start + nbytes > len(buf):
                raise ModelLoadError(
                    f"{path}: tensor {name!r} data (bytes {start}..{start + nbytes}) lies beyond the end of the "
                    f"file ({len(buf)} bytes); the file is truncated - download it again"
                )
            if name in tensors:
                raise ModelLoadError(f"{path}: tensor {name!r} appears twice; the file is corrupt")
            tensors[name] = GgufTensorInfo(name=name, shape=shape, ggml_type=ggml_type, offset=start,
                                           nbytes=nbytes, path=path)
        return cls(path, version, metadata, tensors, alignment, data_offset, buf)

    def tensor(self, name: str) -> Any:
        """The tensor as a torch view of the mapped file: typed for F32/F16/BF16/integers,
        uint8 [..., row_bytes] GGML block bytes for the block types."""
        import torch

        if self._mmap is None:
            raise ModelLoadError(f"{self.path}: the GGUF file was closed")
        info = self.tensors[name]
        raw = torch.frombuffer(self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        if info.is_plain:
            return raw.view(getattr(torch, PLAIN_TYPES[info.ggml_type])).view(info.shape)
        return raw.view(*info.shape[:-1], info.row_bytes)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a tensor still views it; the mapping goes with the last view
            self._mmap = None

    def __enter__(self) -> GgufFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def map_file(path: Path, kind: str, flag: str) -> mmap.mmap:
    """A copy-on-write mapping of a model file (torch gets writable views; the file is never
    modified); missing, empty or unreadable files are one-line errors naming `kind` and `flag`."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: {kind} file not found; check the path given to {flag}")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 4:
                raise ModelLoadError(f"{path}: not a {kind} file (only {size} bytes); download the file again")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the {kind} file ({exc})") from None


def split_siblings(path: Path) -> list[Path]:
    """All files of a split model (``name-00001-of-00003.gguf`` ...) given any one of them; [path]
    for an unsplit file. A missing part is an error naming it."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for p in parts:
        if not p.is_file():
            raise ModelLoadError(f"{p}: part {p.name} of the split GGUF model is missing; download all {count} parts")
    return parts


class GgufModel:
    """The files of one model (one, or the parts of a split): metadata of the first, tensors of all."""

    def __init__(self, files: list[GgufFile]) -> None:
        self.files = files
        self.metadata: dict[str, Any] = dict(files[0].metadata)
        self.tensors: dict[str, GgufTensorInfo] = {}
        self._owner: dict[str, GgufFile] = {}
        for gf in files:
            for name, info in gf.tensors.items():
                if name in self.tensors:
                    raise ModelLoadError(f"{gf.path}: tensor {name!r} is also in {self.tensors[name].path.name}; "
                                         "the split files belong to different models")
                self.tensors[name] = info
                self._owner[name] = gf

    @classmethod
    def open(cls, paths: Iterable[Path | str]) -> GgufModel:
        expanded: list[Path] = []
        for p in paths:
            for part in split_siblings(Path(p)):
                if part not in expanded:
                    expanded.append(part)
        if not expanded:
            raise ModelLoadError("no GGUF file given; pass one with -f/--quantized-file")
        files: list[GgufFile] = []
        try:
            for p in expanded:
                files.append(GgufFile.open(p))
        except BaseException:
            for gf in files:
                gf.close()
            raise
        return cls(files)

    @property
    def path(self) -> Path:
        return self.files[0].path

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor(self, name: str) -> Any:
        return self._owner[name].tensor(name)

    def __iter__(self) -> Iterator[GgufTensorInfo]:
        return iter(self.tensors.values())

    def close(self) -> None:
        for gf in self.files:
            gf.close()

    def __enter__(self) -> GgufModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
