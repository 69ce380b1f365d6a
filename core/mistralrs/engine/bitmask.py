"""llguidance's token bitmasks as bool masks: int32 words [R, W] (bit j of word i = token
32*i + j) expanded into bool rows with vectorised numpy ops (torch without numpy), and the row
copies `batch_masks` and `ConstraintState.fill_mask` need."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"
# _BYTE_BITS[b] = the 8 bits of byte value b, least significant first.
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()

_np: Any
try:  # numpy's unpackbits is the fastest expansion (~30 us for 16 x 32k); torch is the fallback
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is optional
    _np = None


def _mask_bytes(bitmask: torch.Tensor) -> torch.Tensor:
    """[R, W] int32 words -> [R, 4W] uint8, byte k holding tokens 8k..8k+7 (LSB first)."""
    if _LITTLE_ENDIAN:
        return bitmask.contiguous().view(torch.uint8)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32)  # pragma: no cover - big-endian hosts
    return ((bitmask.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(bitmask.shape[0], -1)


def expand_bitmask(bitmask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Expand llguidance's int32 bitmask [R, W] (bit j of word i = token 32*i + j) into a
    contiguous bool tensor [R, width] (width <= 32*W; default 32*W). Vectorised: numpy's
    `unpackbits` over a uint8 view of the words, or (without numpy) a 256-entry lookup table
    gathered with one `index_select`."""
    if bitmask.dim() == 1:
        return expand_bitmask(bitmask.unsqueeze(0), width)[0]
    rows, words = bitmask.shape
    width = 32 * words if width is None else int(width)
    if not 0 <= width <= 32 * words:
        raise ValueError(f"width {width} exceeds the {32 * words} bits of the mask")
    as_bytes = _mask_bytes(bitmask.cpu())
    if _np is not None:
        bits = _np.unpackbits(as_bytes.numpy(), axis=1, count=width, bitorder="little")
        return torch.from_numpy(bits.view(_np.bool_))
    bits = _BYTE_BITS.index_select(0, as_bytes.reshape(-1).int()).view(rows, 32 * words)
    return bits[:, :width].contiguous()


def rows_from_bitmask(bitmask: torch.Tensor, factory: Any, width: int) -> torch.Tensor:
    """Expand `bitmask` [R, W] into fresh, contiguous bool rows [R, width]. The logits-padding
    ids (past the tokenizer's vocabulary) and columns past the factory's vocab_size (a caller
    with wider logits) are False.

    With numpy every step is a single-threaded numpy op: torch would spread these small
    copies over its intra-op pool, and waking that pool costs milliseconds on a busy machine."""
    rows_n, words = bitmask.shape
    bits = 32 * words
    keep = min(width, factory.vocab_size, factory.tokenizer_vocab_size)
    if _np is not None:
        packed = _mask_bytes(bitmask.cpu()).numpy()
        if width <= bits:
            rows = _np.unpackbits(packed, axis=1, count=width, bitorder="little").view(_np.bool_)
        else:
            rows = _np.zeros((rows_n, width), dtype=_np.bool_)
            rows[:, :bits] = _np.unpackbits(packed, axis=1, bitorder="little").view(_np.bool_)
        if keep < width:
            rows[:, keep:] = False
        return torch.from_numpy(rows)
    out = torch.zeros(rows_n, width, dtype=torch.bool)
    out[:, :keep] = expand_bitmask(bitmask, keep)
    return out


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for CPU bool tensors (numpy when possible, see `rows_from_bitmask`)."""
    if _np is not None and dst.device.type == "cpu":
        _np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def all_allowed(rows: int, width: int) -> torch.Tensor:
    """A [rows, width] bool mask with every token allowed."""
    return (
        torch.from_numpy(_np.ones((rows, width), dtype=_np.bool_))
        if _np is not None
        else torch.ones(rows, width, dtype=torch.bool)
    )


def put_rows(out: torch.Tensor, idx: Sequence[int], block: torch.Tensor) -> None:
    """out[idx] = block (`idx` ascending)."""
    if idx[-1] - idx[0] + 1 == len(idx):  # contiguous rows
        copy_rows(out[idx[0] : idx[-1] + 1], block)
    elif _np is not None:
        out.numpy()[idx] = block.numpy()
    else:
        out.index_copy_(0, torch.tensor(idx, dtype=torch.long), block)
