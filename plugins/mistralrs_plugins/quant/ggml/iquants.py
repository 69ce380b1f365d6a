"""Dequantize-only GGML types: the i-quants, ternary and MXFP4 blocks of GGUF files.

IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4 are
read as llama.cpp lays them out (ggml-common.h ``block_*``, little-endian) and dequantized as
its ``dequantize_row_*`` (and gguf-py's numpy version) do, bit for bit: every float32 product
is taken in the same order. We never quantize to them (they need an importance matrix and
llama.cpp's lattice searches); a GGUF file's tensors of these types load as they are and run
through the reference dequantize-then-matmul path.

Each function maps ``uint8 [N, type_size]`` blocks to ``float32 [N, block_size]``, vectorized
over blocks (`formats.dequantize` tiles rows and runs the tiles on worker threads). The lattice
tables are llama.cpp's (`iq_tables`, MIT, the ggml authors), turned into tensors once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import iq_tables as T

# name: (ggml type id, block size, type size): ggml.h `enum ggml_type`, ggml-common.h block sizes
IQ_TYPES: dict[str, tuple[int, int, int]] = {
    "iq2_xxs": (16, 256, 66),
    "iq2_xs": (17, 256, 74),
    "iq3_xxs": (18, 256, 98),
    "iq1_s": (19, 256, 50),
    "iq4_nl": (20, 32, 18),
    "iq3_s": (21, 256, 110),
    "iq2_s": (22, 256, 82),
    "iq4_xs": (23, 256, 136),
    "iq1_m": (29, 256, 56),
    "tq1_0": (34, 256, 54),
    "tq2_0": (35, 256, 66),
    "mxfp4": (39, 32, 17),
}


# ---------------------------------------------------------------------------- tables


def _grid(words: tuple[int, ...], width: int) -> torch.Tensor:
    """llama.cpp's grid words (byte i = value i, little-endian) -> float32 [entries, width]."""
    raw = b"".join(w.to_bytes(width, "little") for w in words)
    return torch.frombuffer(bytearray(raw), dtype=torch.int8).reshape(-1, width).float()


@functools.cache
def tables() -> dict[str, torch.Tensor]:
    """The lookup tables as float32 tensors (built once; read-only by convention)."""
    bits = (torch.arange(256, dtype=torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
    signs8 = 1.0 - 2.0 * bits.float()  # byte -> its 8 bits as +1 (clear) / -1 (set)
    return {
        "iq2xxs": _grid(T.IQ2XXS_GRID, 8),
        "iq2xs": _grid(T.IQ2XS_GRID, 8),
        "iq2s": _grid(T.IQ2S_GRID, 8),
        "iq3xxs": _grid(T.IQ3XXS_GRID, 4),
        "iq3s": _grid(T.IQ3S_GRID, 4),
        "iq1s": _grid(T.IQ1S_GRID, 8),
        "signs8": signs8,
        "ksigns": signs8[torch.tensor(T.KSIGNS_IQ2XS, dtype=torch.int64)],  # 7-bit index -> 8 signs
        "iq4nl": _byte_pairs(T.KVALUES_IQ4NL),
        "mxfp4": _byte_pairs(T.KVALUES_MXFP4),
    }


def _byte_pairs(kvalues: tuple[int, ...]) -> torch.Tensor:
    """A 16-value table -> float32 [256, 2]: a byte's (low nibble's, high nibble's) values, so one
    gather per byte reads both."""
    kv = torch.tensor(kvalues, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([kv[byte & 0xF], kv[byte >> 4]], 1).contiguous()


# ---------------------------------------------------------------------------- helpers


def _fp16_at(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 at byte `off` of each block, as float32 [N, 1]."""
    return b[:, off:off + 2].contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 2k] -> the k little-endian uint16 of each row, as int32 [N, k]."""
    b = b.to(torch.int32)
    return b[:, 0::2] | (b[:, 1::2] << 8)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 4k] -> the k little-endian uint32 of each row, as int64 [N, k]."""
    b = b.to(torch.int64).reshape(b.shape[0], -1, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, k] -> int64 [N, 2k]: low then high nibble of each byte, byte by byte."""
    b = b.to(torch.int64)
    return torch.stack([b & 0xF, b >> 4], 2).reshape(b.shape[0], -1)


def _halves(pairs: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Nibble indices into a 16-value table (`_byte_pairs`), uint8 [..., k] -> float32 [..., 2k]:
    the values of all low nibbles, then of all high nibbles (q4_0's order)."""
    v = pairs.index_select(0, b.reshape(-1).to(torch.int32)).reshape(*b.shape, 2)
    return v.transpose(-1, -2).reshape(*b.shape[:-1], 2 * b.shape[-1])


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table [E, w] rows at idx [N, k] -> [N, k, w]."""
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[1])


def _ksigns(idx7: torch.Tensor) -> torch.Tensor:
    """7-bit ksigns indices [N, k] -> +-1 float32 [N, k, 8]."""
    return _lookup(tables()["ksigns"], idx7)


def _bit_signs(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, k] sign bytes -> +-1 float32 [N, 8k] (bit j of byte i is value 8i + j)."""
    return _lookup(tables()["signs8"], b.to(torch.int64)).reshape(b.shape[0], -1)


# ---------------------------------------------------------------------------- the types


def _dq_iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 8 x (uint32 grid indices (4 bytes), uint32 4 x 7-bit sign indices | scale << 28)
    N = b.shape[0]
    d = _fp16_at(b, 0)
    q = b[:, 2:66].reshape(N, 8, 8)
    aux = _u32(q[:, :, 4:8].reshape(N, 32))  # [N, 8]
    db = d * (0.5 + (aux >> 28).float()) * 0.25
    grid = _lookup(tables()["iq2xxs"], q[:, :, 0:4].to(torch.int64)).reshape(N, 8, 32)
    sidx = (aux[:, :, None] >> torch.tensor([0, 7, 14, 21])) & 0x7F  # [N, 8, 4]
    signs = _ksigns(sidx).reshape(N, 8, 32)
    return (db[:, :, None] * grid * signs).reshape(N, 256)


def _dq_iq2_xs(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 32 x uint16 (9-bit grid index | 7-bit sign index << 9); 8 bytes of 4-bit scales
    N = b.shape[0]
    d = _fp16_at(b, 0)
    qs = _u16(b[:, 2:66]).to(torch.int64)  # [N, 32]
    db = d * (0.5 + _nibbles(b[:, 66:74]).float()) * 0.25  # [N, 16]
    grid = _lookup(tables()["iq2xs"], qs & 511).reshape(N, 16, 16)
    signs = _ksigns(qs >> 9).reshape(N, 16, 16)
    return (db[:, :, None] * grid * signs).reshape(N, 256)


def _dq_iq2_s(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 32 grid index low bytes; 32 sign bytes; 8 bytes of 2-bit high index parts; 8 bytes of scales
    N = b.shape[0]
    d = _fp16_at(b, 0)
    qh = (b[:, 66:74].to(torch.int64)[:, :, None] >> torch.tensor([0, 2, 4, 6])) & 3  # [N, 8, 4]
    idx = b[:, 2:34].to(torch.int64) | (qh.reshape(N, 32) << 8)
    db = d * (0.5 + _nibbles(b[:, 74:82]).float()) * 0.25  # [N, 16]
    grid = _lookup(tables()["iq2s"], idx).reshape(N, 16, 16)
    signs = _bit_signs(b[:, 34:66]).reshape(N, 16, 16)
    return (db[:, :, None] * grid * signs).reshape(N, 256)


def _dq_iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 64 grid indices (4 values each); 8 x uint32 (4 x 7-bit sign indices | scale << 28)
    N = b.shape[0]
    d = _fp16_at(b, 0)
    aux = _u32(b[:, 66:98])  # [N, 8]
    db = d * (0.5 + (aux >> 28).float()) * 0.5
    grid = _lookup(tables()["iq3xxs"], b[:, 2:66].to(torch.int64)).reshape(N, 8, 32)
    sidx = (aux[:, :, None] >> torch.tensor([0, 7, 14, 21])) & 0x7F
    signs = _ksigns(sidx).reshape(N, 8, 32)
    return (db[:, :, None] * grid * signs).reshape(N, 256)


def _dq_iq3_s(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 64 grid index low bytes; 8 bytes of high index bits; 32 sign bytes; 4 bytes of scales
    N = b.shape[0]
    d = _fp16_at(b, 0)
    qh = (b[:, 66:74].to(torch.int64)[:, :, None] >> torch.arange(8)) & 1  # [N, 8, 8]
    idx = b[:, 2:66].to(torch.int64) | (qh.reshape(N, 64) << 8)
    db = d * (1 + 2 * _nibbles(b[:, 106:110])).float()  # [N, 8]
    grid = _lookup(tables()["iq3s"], idx).reshape(N, 8, 32)
    signs = _bit_signs(b[:, 74:106]).reshape(N, 8, 32)
    return (db[:, :, None] * grid * signs).reshape(N, 256)


def _dq_iq1_s(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 32 grid index low bytes; 8 x uint16 (4 x 3-bit high index parts | 3-bit scale << 12 | delta sign << 15)
    N = b.shape[0]
    d = _fp16_at(b, 0)
    qh = _u16(b[:, 34:50]).to(torch.int64)  # [N, 8]
    dl = d * (2 * ((qh >> 12) & 7) + 1).float()
    delta = torch.where((qh & 0x8000) == 0, T.IQ1S_DELTA, -T.IQ1S_DELTA).float()
    hi = (qh[:, :, None] >> torch.tensor([0, 3, 6, 9])) & 7  # [N, 8, 4]
    idx = b[:, 2:34].to(torch.int64) | (hi.reshape(N, 32) << 8)
    grid = _lookup(tables()["iq1s"], idx).reshape(N, 8, 32)
    return (dl[:, :, None] * (grid + delta[:, :, None])).reshape(N, 256)


def _dq_iq1_m(b: torch.Tensor) -> torch.Tensor:
    # 32 grid index low bytes; 16 bytes: per index a nibble (3-bit high part | delta sign << 3);
    # 4 x uint16: 4 x 3-bit scales each, and the fp16 d spread over their top nibbles
    N = b.shape[0]
    sc = _u16(b[:, 48:56])  # [N, 4]
    dbits = ((sc & 0xF000) >> torch.tensor([12, 8, 4, 0], dtype=torch.int32)).sum(1, keepdim=True)  # disjoint bits
    dbits = torch.where(dbits >= 0x8000, dbits - 0x10000, dbits)  # the fp16's bits as int16
    d = dbits.to(torch.int16).view(torch.float16).float()  # [N, 1]
    s = (sc.to(torch.int64)[:, :, None] >> torch.tensor([0, 3, 6, 9])) & 7  # [N, 4, 4]
    dl = d * (2 * s.reshape(N, 16) + 1).float()  # [N, 16], 16 values each
    nib = _nibbles(b[:, 32:48])  # [N, 32]
    idx = b[:, 0:32].to(torch.int64) | ((nib & 7) << 8)
    delta = torch.where((nib & 8) == 0, T.IQ1M_DELTA, -T.IQ1M_DELTA).float()
    grid = _lookup(tables()["iq1s"], idx)  # [N, 32, 8]
    v = grid + delta[:, :, None]
    return (dl[:, :, None] * v.reshape(N, 16, 16)).reshape(N, 256)


def _dq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; 16 bytes: values j (low nibble) and j + 16 (high nibble), indices into kvalues_iq4nl
    return _fp16_at(b, 0) * _halves(tables()["iq4nl"], b[:, 2:18])


def _dq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    # fp16 d; uint16 scales_h (2 bits per sub-block); 4 bytes scales_l (a nibble each); 8 x 16 bytes
    # of 32 nibble indices into kvalues_iq4nl (q4_0's order per sub-block)
    N = b.shape[0]
    d = _fp16_at(b, 0)
    sh = (_u16(b[:, 2:4]).to(torch.int64) >> (2 * torch.arange(8))) & 3  # [N, 8]
    ls = (_nibbles(b[:, 4:8]) | (sh << 4)) - 32
    dl = d * ls.float()  # [N, 8]
    v = _halves(tables()["iq4nl"], b[:, 8:136].reshape(N, 8, 16))  # [N, 8, 32]
    return (dl[:, :, None] * v).reshape(N, 256)


def _dq_tq1_0(b: torch.Tensor) -> torch.Tensor:
    # 48 bytes of 5 base-3 digits each (fixed point: digit k of byte q is ((q * 3^k mod 256) * 3) >> 8),
    # 4 bytes of 4 digits each, fp16 d
    N = b.shape[0]
    pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
    qs = b.to(torch.int32)
    q0 = (qs[:, None, 0:32] * pow3[:, None]) & 0xFF  # [N, 5, 32]
    q1 = (qs[:, None, 32:48] * pow3[:, None]) & 0xFF  # [N, 5, 16]
    qh = (qs[:, None, 48:52] * pow3[:4, None]) & 0xFF  # [N, 4, 4]
    q = torch.cat([q0.reshape(N, 160), q1.reshape(N, 80), qh.reshape(N, 16)], 1)
    q = ((q * 3) >> 8) - 1
    return _fp16_at(b, 52) * q.float()


def _dq_tq2_0(b: torch.Tensor) -> torch.Tensor:
    # 64 bytes of four 2-bit values (value 32 * (4h + k) + l is bits 2k of byte 32h + l), fp16 d
    N = b.shape[0]
    q = (b[:, 0:64].to(torch.int32).reshape(N, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)[:, None]) & 3
    return _fp16_at(b, 64) * (q.reshape(N, 256) - 1).float()


def _dq_mxfp4(b: torch.Tensor) -> torch.Tensor:
    # e8m0 exponent e, then 16 bytes of e2m1 nibbles (q4_0's order); value = 2^(e-128) * doubled e2m1
    e = b[:, 0:1].to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)  # ggml_e8m0_to_fp32_half
    d = bits.view(torch.float32)
    return d * _halves(tables()["mxfp4"], b[:, 1:17])


DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "iq2_xxs": _dq_iq2_xxs, "iq2_xs": _dq_iq2_xs, "iq3_xxs": _dq_iq3_xxs, "iq1_s": _dq_iq1_s,
    "iq4_nl": _dq_iq4_nl, "iq3_s": _dq_iq3_s, "iq2_s": _dq_iq2_s, "iq4_xs": _dq_iq4_xs,
    "iq1_m": _dq_iq1_m, "tq1_0": _dq_tq1_0, "tq2_0": _dq_tq2_0, "mxfp4": _dq_mxfp4,
}
