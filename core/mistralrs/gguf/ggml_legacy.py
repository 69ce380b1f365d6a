"""Legacy GGML model files: llama.cpp's Llama formats before GGUF (magic ``ggml``, ``ggmf`` v1,
``ggjt`` v1-v3; the ``*.ggmlv3.q4_0.bin`` files of 2023), read as a `GgufModel`.

    model = open_ggml(path, gqa=8)   # a GgufModel: GGUF metadata keys, GGUF tensor names
    model.metadata["llama.attention.head_count_kv"], model.tensor("blk.0.attn_q.weight")

What llama.cpp's ``convert_llama_ggml_to_gguf.py`` does, done at load time without writing a file:

- Layout (little-endian): magic u32 (``ggml`` = bytes ``lmgg``; ``ggmf``/``ggjt`` then a version
  u32), hyper-parameters (n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype: u32 each), the
  vocabulary (per token: length u32, bytes, score f32 — no score in unversioned ``ggml``), then
  tensors to the end of the file: n_dims, name length, type (u32 each), dims (u32 each, innermost
  first), the name, padding to 32 bytes (``ggjt`` only), the data. The block layouts are GGUF's.
- Hyper-parameters become ``llama.*`` metadata: ``head_count_kv = n_head / gqa`` (the file does
  not store it: ``--gqa 8`` for Llama 2 70B), ``feed_forward_length`` from the shape of
  ``layers.0.feed_forward.w1`` (n_mult only rounds it), ``rope.dimension_count = n_embd / n_head``,
  the converter's defaults for what the file lacks: RMS-norm epsilon 5e-6 (its ``--eps``; Llama 1
  used 1e-6, Llama 2 1e-5) and context length 2048 (its ``--context-length``; ``--max-seq-len``
  raises the served context).
- The vocabulary becomes a ``llama`` (SentencePiece) tokenizer as the converter writes it: ids 0/1/2
  are ``<unk>``/``<s>``/``</s>``, single bytes at ids 3-258 are byte tokens ``<0xXX>``, an empty
  token is a control token, spaces are ``▁`` again.
- Tensor names map to GGUF's (``tok_embeddings`` -> ``token_embd``, ``layers.N.attention.wq`` ->
  ``blk.N.attn_q`` ...). Q/K rows are stored permuted the llama.cpp way, as in a GGUF file, so
  the ``llama`` GGUF converter's un-permutation applies unchanged.

Refused, as llama.cpp's converter refuses them: quantized tensors in files older than ggjt v2
(the Q4/Q8 block layouts changed in v2), and Q4_0/Q4_1/Q8_0 tensors in ggjt v2 files (their
scales became f16 in v3). Such files cannot be read correctly; re-quantize from the original
weights. Every malformed file is a one-line `ModelLoadError` naming the file.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from mistralrs.errors import ConfigError, ModelLoadError
from mistralrs.gguf.reader import (
    GGML_TYPES,
    PLAIN_TYPES,
    GgufFile,
    GgufModel,
    GgufTensorInfo,
    _Cursor,
    map_file,
    type_name,
)

# File magic (the u32 as it lies on disk) -> container name.
MAGICS: dict[bytes, str] = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}
ALIGNMENT = 32  # ggjt pads each tensor's data to 32 bytes of the file

DEFAULT_RMS_NORM_EPS = 5e-6  # convert_llama_ggml_to_gguf.py --eps
DEFAULT_CONTEXT_LENGTH = 2048  # convert_llama_ggml_to_gguf.py --context-length

# llama.h's `llama_ftype` of the legacy era (hparams.ftype): the file's description only.
FTYPES: dict[int, str] = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 4: "MOSTLY_Q4_1_SOME_F16",
    5: "MOSTLY_Q4_2", 6: "MOSTLY_Q4_3", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1",
    10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S",
    15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
}
_UNQUANTIZED_FTYPES = (0, 1)
_V2_CHANGED_FTYPES = (2, 3, 4, 7)  # Q4_0, Q4_1, Q4_1_SOME_F16, Q8_0: layouts changed again in ggjt v3

# Tensor types a legacy file may hold: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K
# (4 and 5 were Q4_2 and Q4_3, removed from ggml in May 2023).
LEGACY_TYPES = (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
_REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3"}
_V3_CHANGED_TYPES = (2, 3, 8, 9)  # Q4_0, Q4_1, Q8_0, Q8_1: f32 scales before ggjt v3

# The original (Meta) checkpoint names of legacy files -> GGUF names (gguf-py's TensorNameMap).
TOP_NAMES: dict[str, str] = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
BLOCK_NAMES: dict[str, str] = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "attention_norm": "attn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "ffn_norm": "ffn_norm",
}
# Meta's rotary inverse frequencies (some early conversions kept them): llama.cpp never read
# them, and GGUF's ``rope_freqs`` means something else (Llama 3 scaling factors).
SKIPPED_NAMES = ("rope.freqs",)

_BLOCK_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([A-Za-z0-9_.]+)\.(weight|bias)$")
_SPIECE = "\u2581"

_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")


def legacy_magic(path: Path | str) -> str | None:
    """``ggml``/``ggmf``/``ggjt`` when the file starts with a legacy GGML magic, else None."""
    try:
        with open(path, "rb") as f:
            return MAGICS.get(f.read(4))
    except OSError:
        return None


def is_legacy_ggml(path: Path | str) -> bool:
    return legacy_magic(path) is not None


class _Reader(_Cursor):
    """Sequential little-endian reads (u32 counts); running off the end of the file is 'truncated'."""

    def __init__(self, buf: Any, path: Path) -> None:
        super().__init__(buf, path, wide=False, kind="GGML")

    def u32s(self, n: int, what: str) -> tuple[int, ...]:
        self.need(4 * n, what)
        values = struct.unpack_from(f"<{n}I", self.buf, self.pos)
        self.pos += 4 * n
        return values

    def f32(self, what: str) -> float:
        self.need(4, what)
        (v,) = _F32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


class GgmlFile(GgufFile):
    """One legacy GGML file as a `GgufFile`: GGUF metadata and tensor names, tensors as views of
    the (copy-on-write) mapped file. `container` names the format (``ggjt v3`` ...)."""

    container: str = "ggml"

    @classmethod
    def open(cls, path: Path | str, *, gqa: int = 1, rms_norm_eps: float = DEFAULT_RMS_NORM_EPS,  # type: ignore[override]
             context_length: int = DEFAULT_CONTEXT_LENGTH) -> GgmlFile:
        path = Path(path)
        if isinstance(gqa, bool) or not isinstance(gqa, int) or gqa < 1:
            raise ConfigError(f"--gqa must be a positive integer, not {gqa!r}")
        mapping = map_file(path, "GGML", "-m/-f")
        try:
            return cls._parse_legacy(path, mapping, gqa=gqa, rms_norm_eps=rms_norm_eps,
                                     context_length=context_length)
        except BaseException:
            mapping.close()
            raise

    @classmethod
    def _parse_legacy(cls, path: Path, buf: mmap.mmap, *, gqa: int, rms_norm_eps: float,
                      context_length: int) -> GgmlFile:
        r = _Reader(buf, path)
        magic = r.raw(4, "the magic")
        kind = MAGICS.get(magic)
        if kind is None:
            hint = "; it is a GGUF file - load it without --format ggml" if magic == b"GGUF" else ""
            raise ModelLoadError(f"{path}: not a legacy GGML file (magic {magic!r}){hint}")
        version = 1 if kind == "ggml" else r.u32("the version")
        if (kind == "ggmf" and version != 1) or (kind == "ggjt" and not 1 <= version <= 3):
            raise ModelLoadError(
                f"{path}: {kind} version {version} is not a legacy GGML version (ggmf v1 and ggjt v1-v3 exist); "
                "the file is corrupt"
            )
        label = kind if kind == "ggml" else f"{kind} v{version}"
        n_vocab, n_embd, _n_mult, n_head, n_layer, _n_rot, ftype = r.u32s(7, "the hyper-parameters")
        ftype %= 1000  # ggml's examples add 1000 * quantization version; llama.cpp never did
        if not (n_vocab >= 3 and n_embd and n_head and n_layer and n_embd % n_head == 0):
            raise ModelLoadError(
                f"{path}: implausible hyper-parameters in the {label} header (n_vocab={n_vocab}, n_embd={n_embd}, "
                f"n_head={n_head}, n_layer={n_layer}); the file is corrupt or not a Llama model"
            )
        texts, scores = _read_vocab(r, n_vocab, with_scores=kind != "ggml")
        infos = _read_tensor_infos(r, kind, version, label)
        tensors = _gguf_tensors(path, infos)
        n_kv = _kv_heads(path, tensors, n_head=n_head, n_embd=n_embd, gqa=gqa)
        ffn = tensors.get("blk.0.ffn_gate.weight")
        if ffn is None:
            raise ModelLoadError(f"{path}: no tensor layers.0.feed_forward.w1.weight; not a Llama model file")
        tokens, types = _tokens(texts)
        metadata: dict[str, Any] = {
            "general.architecture": "llama",
            "general.name": path.name,
            "general.description": f"converted from legacy {kind.upper()}v{version} "
                                   f"{FTYPES.get(ftype, f'ftype {ftype}')} format",
            "general.file_type": ftype,
            "llama.context_length": int(context_length),
            "llama.embedding_length": n_embd,
            "llama.block_count": n_layer,
            "llama.feed_forward_length": int(ffn.shape[0]),
            "llama.rope.dimension_count": n_embd // n_head,
            "llama.attention.head_count": n_head,
            "llama.attention.head_count_kv": n_kv,
            "llama.attention.layer_norm_rms_epsilon": float(rms_norm_eps),
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        }
        data_offset = min(info.offset for info in tensors.values())
        out = cls(path, version, metadata, tensors, ALIGNMENT if kind == "ggjt" else 1, data_offset, buf)
        out.container = label
        return out

    def tensor(self, name: str) -> Any:
        """As `GgufFile.tensor`; the unpadded data of ``ggml``/``ggmf`` files (F32/F16 only) may sit
        at any byte, so a misaligned tensor is copied out."""
        info = self.tensors[name]
        if info.is_plain and info.offset % 4 and self._mmap is not None:
            import torch

            raw = torch.frombuffer(bytearray(self._mmap[info.offset:info.offset + info.nbytes]), dtype=torch.uint8)
            return raw.view(getattr(torch, PLAIN_TYPES[info.ggml_type])).view(info.shape)
        return super().tensor(name)


def _read_vocab(r: _Reader, n_vocab: int, *, with_scores: bool) -> tuple[list[bytes], Any]:
    r.need((8 if with_scores else 4) * n_vocab, f"the vocabulary of {n_vocab} tokens")  # before allocating
    texts: list[bytes] = []
    scores = np.zeros(n_vocab, dtype=np.float32)
    for i in range(n_vocab):
        what = f"vocabulary entry {i}"
        n = r.u32(what)
        if n >= 4096:
            raise ModelLoadError(f"{r.path}: vocabulary entry {i} claims {n} bytes; the file is corrupt")
        texts.append(r.raw(n, what))
        if with_scores:
            scores[i] = r.f32(what)
    return texts, scores


def _tokens(texts: list[bytes]) -> tuple[list[str], list[int]]:
    """The converter's ``add_vocab``: token texts and llama.cpp token types (1 normal, 2 unknown,
    3 control, 6 byte)."""
    tokens: list[str] = []
    types: list[int] = []
    for i, text in enumerate(texts):
        if i <= 2:
            token, kind = ("<unk>", 2) if i == 0 else ("<s>" if i == 1 else "</s>", 3)
        elif not text:
            token, kind = "", 3
        elif i <= 258 and len(text) == 1:
            token, kind = f"<0x{text[0]:02X}>", 6
        else:
            token, kind = text.decode("utf-8", "replace").replace(" ", _SPIECE), 1
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _check_type(path: Path, name: str, ggml_type: int, kind: str, version: int, label: str) -> None:
    if ggml_type in _REMOVED_TYPES:
        raise ModelLoadError(
            f"{path}: tensor {name!r} is {_REMOVED_TYPES[ggml_type]}, a type llama.cpp removed in May 2023; "
            "re-quantize the original weights with a current llama.cpp"
        )
    if ggml_type not in LEGACY_TYPES:
        raise ModelLoadError(f"{path}: tensor {name!r} has type id {ggml_type}, which legacy GGML files never held; "
                             "the file is corrupt")
    tname = type_name(ggml_type)
    if (kind != "ggjt" or version < 2) and ggml_type not in (0, 1):
        raise ModelLoadError(
            f"{path}: a {label} file with {tname} tensors: llama.cpp's quantization formats changed in ggjt v2, "
            "and this older layout cannot be read (only F32/F16 files of this version load); re-quantize the "
            "original weights with a current llama.cpp"
        )
    if kind == "ggjt" and version == 2 and ggml_type in _V3_CHANGED_TYPES:
        raise ModelLoadError(
            f"{path}: a ggjt v2 file with {tname} tensors: Q4_0, Q4_1 and Q8_0 changed again in ggjt v3, and the "
            "v2 layout cannot be read (Q5 and F16/F32 files of v2 load); re-quantize the original weights with a "
            "current llama.cpp"
        )


def _read_tensor_infos(r: _Reader, kind: str, version: int, label: str) -> list[tuple[str, tuple[int, ...], int, int, int]]:
    """(name, torch-order shape, type, absolute offset, bytes) of every tensor, to the end of the file."""
    infos: list[tuple[str, tuple[int, ...], int, int, int]] = []
    padded = kind == "ggjt"
    while r.pos < r.size:
        what = f"the header of tensor {len(infos)}"
        n_dims, name_len, ggml_type = r.u32s(3, what)
        if not 1 <= n_dims <= 4 or not 0 < name_len < 4096:
            raise ModelLoadError(
                f"{r.path}: tensor {len(infos)} has {n_dims} dimensions and a {name_len}-byte name; the file is corrupt"
            )
        dims = r.u32s(n_dims, what)
        name = r.raw(name_len, what).decode("utf-8", "replace")
        _check_type(r.path, name, ggml_type, kind, version, label)
        if padded:
            r.pos = -(-r.pos // ALIGNMENT) * ALIGNMENT
        tname, bs, ts = GGML_TYPES[ggml_type]
        if dims[0] % bs:
            raise ModelLoadError(
                f"{r.path}: tensor {name!r} of type {tname} has a row of {dims[0]} values, not a multiple of its block "
                f"size {bs}; the file is corrupt"
            )
        n = 1
        for d in dims:
            n *= d
        nbytes = n // bs * ts
        if r.pos + nbytes > r.size:
            raise ModelLoadError(
                f"{r.path}: tensor {name!r} data (bytes {r.pos}..{r.pos + nbytes}) lies beyond the end of the file "
                f"({r.size} bytes); the file is truncated - download it again"
            )
        infos.append((name, tuple(reversed(dims)), ggml_type, r.pos, nbytes))
        r.pos += nbytes
    if not infos:
        raise ModelLoadError(f"{r.path}: the {label} file holds no tensors; it is truncated - download it again")
    return infos


def gguf_name(name: str) -> str | None:
    """The GGUF name of a legacy tensor name (None: a tensor to skip; KeyError: unknown)."""
    if name in SKIPPED_NAMES or name.removesuffix(".weight") in SKIPPED_NAMES:
        return None
    m = _BLOCK_RE.match(name)
    if m:
        key = BLOCK_NAMES.get(m.group(2))
        if key is not None:
            return f"blk.{m.group(1)}.{key}.{m.group(3)}"
    else:
        m = _TOP_RE.match(name)
        key = TOP_NAMES.get(m.group(1)) if m else None
        if m is not None and key is not None:
            return f"{key}.{m.group(2)}"
    raise KeyError(name)


def _gguf_tensors(path: Path, infos: list[tuple[str, tuple[int, ...], int, int, int]]) -> dict[str, GgufTensorInfo]:
    tensors: dict[str, GgufTensorInfo] = {}
    for name, shape, ggml_type, offset, nbytes in infos:
        try:
            new = gguf_name(name)
        except KeyError:
            raise ModelLoadError(
                f"{path}: tensor {name!r} is not part of a Llama model as legacy GGML files name it; only Llama "
                "legacy files load (other architectures: use a GGUF file)"
            ) from None
        if new is None:
            continue
        if new in tensors:
            raise ModelLoadError(f"{path}: tensor {name!r} appears twice; the file is corrupt")
        tensors[new] = GgufTensorInfo(name=new, shape=shape, ggml_type=ggml_type, offset=offset, nbytes=nbytes,
                                      path=path)
    return tensors


def _kv_heads(path: Path, tensors: dict[str, GgufTensorInfo], *, n_head: int, n_embd: int, gqa: int) -> int:
    """n_head / gqa, checked against the rows of the first K projection (the file does not say)."""
    if n_head % gqa:
        raise ConfigError(
            f"{path}: --gqa {gqa} does not divide the model's {n_head} attention heads; pass its grouped-query "
            "factor (8 for Llama 2 70B, else 1)"
        )
    n_kv = n_head // gqa
    head_dim = n_embd // n_head
    wk = tensors.get("blk.0.attn_k.weight")
    if wk is not None and wk.shape[0] != n_kv * head_dim:
        rows = wk.shape[0]
        if rows % head_dim or n_head % max(rows // head_dim, 1) or not rows:
            raise ModelLoadError(
                f"{path}: layers.0.attention.wk has {rows} rows, which no number of {head_dim}-dimensional heads "
                f"dividing {n_head} makes; the file is corrupt"
            )
        right = n_head // (rows // head_dim)
        raise ConfigError(
            f"{path}: --gqa {gqa} does not fit this model: its K projection has {rows} rows, {rows // head_dim} KV "
            f"heads for {n_head} attention heads; pass --gqa {right}"
        )
    return n_kv


def open_ggml(path: Path | str, *, gqa: int = 1, rms_norm_eps: float = DEFAULT_RMS_NORM_EPS,
              context_length: int = DEFAULT_CONTEXT_LENGTH) -> GgufModel:
    """A legacy GGML file as a `GgufModel` (architecture ``llama``), ready for `gguf.loading`."""
    return GgufModel([GgmlFile.open(path, gqa=gqa, rms_norm_eps=rms_norm_eps, context_length=context_length)])
