"""Row-interleaved GGML blocks: the layout a CPU kernel may ask a layer's ``qweight`` to be kept in.

A kernel whose vector lanes are rows of W (each lane one output, the activations broadcast; the way
llama.cpp's repacked ``q4_0_8x8`` kernels run) reads the blocks of ``ROWS`` consecutive rows side by
side. A ``qmatmul_<type>`` kernel that wants it carries ``interleave = ROWS``; the GGML linear method
then keeps the layer's ``qweight`` interleaved (`GgmlLinearMethod.process_after_loading`) and gives
the canonical block bytes wherever they leave the layer (dequantize, UQFF, embedding lookups).

Layout (q4_0, ROWS = 8): uint8 [N / 8, 8 * row_bytes]; row g holds rows 8g .. 8g + 7, block by block,
144 bytes per block: the 8 rows' fp16 scales (16 bytes), then for k = 0..3 the 8 rows' quant bytes
4k .. 4k + 3 (32 bytes: row r at 4r). Byte i of a q4_0 block holds elements i (low nibble) and 16 + i
(high), so chunk k's low nibbles are elements 4k .. 4k + 3 of each row, its high nibbles 16 + 4k ..
16 + 4k + 3. The shape tells the layouts apart: canonical is [N, row_bytes]. Interleaving permutes
bytes within each group of 8 rows, so a group-aligned slice or concatenation of interleaved tensors is
the interleaved form of those rows (layers fuse and split as before when their rows are multiples of 8).
"""

from __future__ import annotations

import torch

ROWS = 8
# Types that have an interleaved layout.
TYPES = frozenset({"q4_0"})


def can_interleave(qtype: str, out_features: int) -> bool:
    return qtype in TYPES and out_features > 0 and out_features % ROWS == 0


def is_interleaved(qweight: torch.Tensor, out_features: int) -> bool:
    """Whether `qweight` (of a layer with `out_features` rows) is in the interleaved layout."""
    return qweight.dim() == 2 and out_features % ROWS == 0 and qweight.shape[0] * ROWS == out_features \
        and out_features != 0


def interleave(qtype: str, qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, row_bytes] -> interleaved [N / 8, 8 * row_bytes] (a new tensor)."""
    if qtype != "q4_0":
        raise ValueError(f"{qtype} has no interleaved layout")
    n, rb = qweight.shape
    nb = rb // 18
    blocks = qweight.reshape(n // ROWS, ROWS, nb, 18).transpose(1, 2)  # [G, nb, 8, 18]
    scales = blocks[..., :2].reshape(n // ROWS, nb, 2 * ROWS)
    quants = blocks[..., 2:].reshape(n // ROWS, nb, ROWS, 4, 4).transpose(2, 3).reshape(n // ROWS, nb, 16 * ROWS)
    return torch.cat([scales, quants], dim=-1).reshape(n // ROWS, ROWS * rb).contiguous()


def deinterleave(qtype: str, packed: torch.Tensor) -> torch.Tensor:
    """Interleaved [N / 8, 8 * row_bytes] -> canonical [N, row_bytes] (a new tensor)."""
    if qtype != "q4_0":
        raise ValueError(f"{qtype} has no interleaved layout")
    g, grb = packed.shape
    nb = grb // (18 * ROWS)
    blocks = packed.reshape(g, nb, 18 * ROWS)
    scales = blocks[..., :2 * ROWS].reshape(g, nb, ROWS, 2)
    quants = blocks[..., 2 * ROWS:].reshape(g, nb, 4, ROWS, 4).transpose(2, 3).reshape(g, nb, ROWS, 16)
    rows = torch.cat([scales, quants], dim=-1).transpose(1, 2)  # [G, 8, nb, 18]
    return rows.reshape(g * ROWS, nb * 18).contiguous()


def deinterleave_rows(qtype: str, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The canonical bytes of some rows (an embedding lookup) without deinterleaving the whole tensor."""
    return deinterleave(qtype, packed[torch.div(rows, ROWS, rounding_mode="floor")].reshape(-1, packed.shape[1])) \
        .reshape(rows.numel(), ROWS, -1)[torch.arange(rows.numel(), device=rows.device), rows.reshape(-1) % ROWS]
