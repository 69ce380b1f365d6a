"""Row-interleaved GGML blocks: the layout a CPU kernel may ask a layer's ``qweight`` to be kept in.

A kernel whose vector lanes are rows of W (each lane one output, the activations broadcast; the way
llama.cpp's repacked ``q4_0_8x8`` / ``q4_K_8x8`` kernels run) reads the blocks of ``ROWS`` consecutive
rows side by side. A ``qmatmul_<type>`` kernel that wants it carries ``interleave = ROWS``; the GGML
linear method then keeps the layer's ``qweight`` interleaved (`GgmlLinearMethod.process_after_loading`)
and gives the canonical block bytes wherever they leave the layer (dequantize, UQFF, embedding lookups).

Layouts: uint8 [N / 8, nb * GROUP_BLOCK_BYTES[type]]; row g holds rows 8g .. 8g + 7, block by block.

- q4_0, 144 bytes per block: the 8 rows' fp16 scales (16 bytes), then for k = 0..3 the 8 rows' quant
  bytes 4k .. 4k + 3 (32 bytes: row r at 4r). Byte i of a q4_0 block holds elements i (low nibble) and
  16 + i (high), so chunk k's low nibbles are elements 4k .. 4k + 3 of each row, its high nibbles 16 + 4k ..
  16 + 4k + 3.
- q4k, 1184 bytes per block: the 8 rows' fp16 d (16 bytes), their fp16 dmin (16), the 6-bit sub-block scales
  decoded to bytes, sub-block-major (64: byte 8s + r is row r's scale s), the mins in pairs (64: byte 16p + 2r
  + i is row r's min 2p + i), then for chunk j = 0..3 and t = 0..7 the 8 rows' quant bytes 32j + 4t .. +3
  (32 bytes: row r at 4r; low nibbles are elements 64j + 4t .., sub-block 2j, high nibbles sub-block 2j + 1).
  Decoding the 12 packed scale bytes is a bijection (96 bits hold the 16 6-bit values), so the round trip is
  exact; 32 bytes a block more than the canonical 8 x 144 (2.8%) buy a tile that reads scales directly.
- q5k, 1440 bytes per block: as q4k, with the high-bit bytes after the mins: for t = 0..7 the 8 rows' bytes
  4t .. 4t + 3 of ``qh`` (256 bytes: row r at 4r; bit 2j of byte l is element 64j + l's fifth bit, bit 2j + 1
  element 64j + 32 + l's), then the quants from byte 416.

The shape tells the layouts apart: canonical is [N, row_bytes]. Each group of 8 rows is transformed on its
own, so a group-aligned slice or concatenation of interleaved tensors is the interleaved form of those rows
(layers fuse and split as before when their rows are multiples of 8).
"""

from __future__ import annotations

import torch

ROWS = 8
# Bytes per block of a group of ROWS rows, for the types that have an interleaved layout.
GROUP_BLOCK_BYTES = {"q4_0": 144, "q4k": 1184, "q5k": 1440}
TYPES = frozenset(GROUP_BLOCK_BYTES)
_CANONICAL = {"q4_0": (32, 18), "q4k": (256, 144), "q5k": (256, 176)}  # elements and bytes per block


def can_interleave(qtype: str, out_features: int) -> bool:
    return qtype in TYPES and out_features > 0 and out_features % ROWS == 0


def is_interleaved(qweight: torch.Tensor, out_features: int) -> bool:
    """Whether `qweight` (of a layer with `out_features` rows) is in the interleaved layout."""
    return qweight.dim() == 2 and out_features % ROWS == 0 and qweight.shape[0] * ROWS == out_features \
        and out_features != 0


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one interleaved row (a group of ROWS rows of W) for `in_features` columns."""
    return in_features // _CANONICAL[qtype][0] * GROUP_BLOCK_BYTES[qtype]


def _check(qtype: str) -> None:
    if qtype not in TYPES:
        raise ValueError(f"{qtype} has no interleaved layout")


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_K's 12 packed bytes [..., 12] -> the 8 6-bit scales and 8 mins [..., 8] (llama.cpp's get_scale_min_k4)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], -1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    return sc, mn


def _k_pack(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The inverse of `_k_scales_mins`."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([lo, mid, hi], -1)


def interleave(qtype: str, qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, row_bytes] -> interleaved [N / 8, nb * GROUP_BLOCK_BYTES] (a new tensor)."""
    _check(qtype)
    n, rb = qweight.shape
    g, bb = n // ROWS, _CANONICAL[qtype][1]
    nb = rb // bb
    blocks = qweight.reshape(g, ROWS, nb, bb).transpose(1, 2)  # [G, nb, 8, bb]
    if qtype == "q4_0":
        scales = blocks[..., :2].reshape(g, nb, 2 * ROWS)
        quants = blocks[..., 2:].reshape(g, nb, ROWS, 4, 4).transpose(2, 3).reshape(g, nb, 16 * ROWS)
        parts = [scales, quants]
    else:
        return _interleave_k(qtype, qweight.contiguous(), g, nb)
    return torch.cat(parts, dim=-1).reshape(g, nb * GROUP_BLOCK_BYTES[qtype]).contiguous()


def _interleave_k(qtype: str, qweight: torch.Tensor, g: int, nb: int) -> torch.Tensor:
    """`interleave` for q4k/q5k, written into one tensor; the quads moved as int32 (a model's load runs this on
    every such layer: byte-wise permutes took 10x as long)."""
    bb, gb = _CANONICAL[qtype][1], GROUP_BLOCK_BYTES[qtype]
    out = torch.empty(g, nb, gb, dtype=torch.uint8, device=qweight.device)
    halves = qweight.view(torch.int16).reshape(g, ROWS, nb, bb // 2)
    out[..., 0:16].view(torch.int16).copy_(halves[..., 0].transpose(1, 2))  # d
    out[..., 16:32].view(torch.int16).copy_(halves[..., 1].transpose(1, 2))  # dmin
    sc, mn = _k_scales_mins(qweight.reshape(g, ROWS, nb, bb)[..., 4:16])  # [G, 8 rows, nb, 8]
    out[..., 32:96].copy_(sc.permute(0, 2, 3, 1).reshape(g, nb, 64))
    out[..., 96:160].copy_(mn.reshape(g, ROWS, nb, 4, 2).permute(0, 2, 3, 1, 4).reshape(g, nb, 64))
    words = qweight.view(torch.int32).reshape(g, ROWS, nb, bb // 4)
    qs = 4 if qtype == "q4k" else 12  # the quants' first word in a block
    if qtype == "q5k":  # qh by quad
        out[..., 160:416].view(torch.int32).copy_(words[..., 4:12].permute(0, 2, 3, 1).reshape(g, nb, 64))
    out[..., gb - 1024:].view(torch.int32).copy_(
        words[..., qs:].reshape(g, ROWS, nb, 4, 8).permute(0, 2, 3, 4, 1).reshape(g, nb, 256))
    return out.reshape(g, nb * gb)


def deinterleave(qtype: str, packed: torch.Tensor) -> torch.Tensor:
    """Interleaved [N / 8, nb * GROUP_BLOCK_BYTES] -> canonical [N, row_bytes] (a new tensor)."""
    _check(qtype)
    g, grb = packed.shape
    nb = grb // GROUP_BLOCK_BYTES[qtype]
    blocks = packed.reshape(g, nb, GROUP_BLOCK_BYTES[qtype])
    if qtype == "q4_0":
        scales = blocks[..., :2 * ROWS].reshape(g, nb, ROWS, 2)
        quants = blocks[..., 2 * ROWS:].reshape(g, nb, 4, ROWS, 4).transpose(2, 3).reshape(g, nb, ROWS, 16)
        parts = [scales, quants]
    else:
        sc = blocks[..., 32:96].reshape(g, nb, 8, ROWS).transpose(2, 3)
        mn = blocks[..., 96:160].reshape(g, nb, 4, ROWS, 2).transpose(2, 3).reshape(g, nb, ROWS, 8)
        qs = 160 if qtype == "q4k" else 416
        parts = [blocks[..., 0:16].reshape(g, nb, ROWS, 2), blocks[..., 16:32].reshape(g, nb, ROWS, 2),
                 _k_pack(sc, mn)]
        if qtype == "q5k":
            parts.append(blocks[..., 160:416].reshape(g, nb, 8, ROWS, 4).transpose(2, 3).reshape(g, nb, ROWS, 32))
        parts.append(blocks[..., qs:].reshape(g, nb, 4, 8, ROWS, 4).permute(0, 1, 4, 2, 3, 5).reshape(g, nb, ROWS, 128))
    rows = torch.cat(parts, dim=-1).transpose(1, 2)  # [G, 8, nb, bb]
    return rows.reshape(g * ROWS, nb * _CANONICAL[qtype][1]).contiguous()


def deinterleave_rows(qtype: str, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The canonical bytes of some rows (an embedding lookup) without deinterleaving the whole tensor."""
    return deinterleave(qtype, packed[torch.div(rows, ROWS, rounding_mode="floor")].reshape(-1, packed.shape[1])) \
        .reshape(rows.numel(), ROWS, -1)[torch.arange(rows.numel(), device=rows.device), rows.reshape(-1) % ROWS]
