"""The affine group layout: weights ``w = s * q + b`` with unsigned 4- or 8-bit codes q and fp32 (s, b)
per group of consecutive weights of a row -- what AWQ, asymmetric GPTQ, MLX/AFQ and axis-1 HQQ
checkpoints all are -- laid out once at load for the native ``qmatmul_affine`` kernels.

A row is a run of super-blocks of 128 weights (the last zero-padded: codes 0, s = b = 0), each
``codes | pairs scales | pairs offsets`` with `pairs` = 128 / group for groups of 32 and 64 and 1
for groups of 128 or more (a group of 256 stores its pair in both of its super-blocks). Codes:
byte 16j + i (j < 4, i < 16) of a super-block holds element 32j + i (4-bit: low nibble) and
element 32j + 16 + i (4-bit: its high nibble; 8-bit: byte 64 + 16j + i). That is q4_0's nibble
order per block of 32, and the order the kernels' quantized activations come in, so a kernel
unpacks with masks only (kernels/cpu_quant/qmatmul.h has the same description).

s and b are stored in fp32, so a format whose own scales and offsets are exact in fp32 (16-bit
scales, integer zero points times a 16-bit scale) dequantizes from this layout exactly as from
its published tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPER_BLOCK = 128
BITS = (4, 8)


def pairs_for(group_size: int, in_features: int) -> int | None:
    """Pairs per super-block for groups of `group_size` along a row of `in_features` (-1 or >= in: one
    group), or None when the layout cannot hold such groups."""
    g = in_features if group_size <= 0 or group_size >= in_features else group_size
    if g % 32:
        return None
    if g < SUPER_BLOCK:
        return SUPER_BLOCK // g if SUPER_BLOCK % g == 0 else None
    return 1 if g % SUPER_BLOCK == 0 or g == in_features else None


def row_bytes(in_features: int, bits: int, pairs: int) -> int:
    return -(-in_features // SUPER_BLOCK) * (16 * bits + 8 * pairs)


def _pair_groups(in_features: int, group_size: int, pairs: int) -> torch.Tensor:
    """The group index of each stored pair [super-blocks * pairs] (-1: padding)."""
    nsb = -(-in_features // SUPER_BLOCK)
    span = SUPER_BLOCK // pairs  # weights per pair
    first = torch.arange(nsb * pairs) * span  # the first weight each pair covers
    g = in_features if group_size <= 0 or group_size >= in_features else group_size
    return torch.where(first < in_features, first // g, torch.full_like(first, -1))


def pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int,
         group_size: int) -> tuple[torch.Tensor, int]:
    """codes [N, K] (integers in [0, 2**bits)), scales and offsets [N, groups] -> (uint8 [N, row_bytes], pairs)."""
    n, k = codes.shape
    pairs = pairs_for(group_size, k)
    if bits not in BITS or pairs is None:
        raise ValueError(f"the affine layout takes 4 or 8 bits and groups of 32, 64 or a multiple of 128, "
                         f"not {bits} bits in groups of {group_size} over {k}")
    nsb = -(-k // SUPER_BLOCK)
    q = codes.to(torch.uint8)
    if nsb * SUPER_BLOCK != k:
        q = F.pad(q, (0, nsb * SUPER_BLOCK - k))
    q = q.reshape(n, nsb, 4, 2, 16)  # [row, super-block, block j, half, i]
    if bits == 4:
        body = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, nsb, 64)
    else:
        body = q.permute(0, 1, 3, 2, 4).reshape(n, nsb, 128)
    idx = _pair_groups(k, group_size, pairs)
    pad = idx < 0
    idx = idx.clamp(min=0)
    s = scales.to(torch.float32)[:, idx].masked_fill(pad, 0.0).reshape(n, nsb, pairs)
    b = offsets.to(torch.float32)[:, idx].masked_fill(pad, 0.0).reshape(n, nsb, pairs)
    sb = torch.cat([s, b], dim=-1).contiguous().view(torch.uint8)  # [n, nsb, 8 * pairs]
    return torch.cat([body, sb], dim=-1).reshape(n, -1).contiguous(), pairs


def unpack(packed: torch.Tensor, in_features: int, bits: int,
           pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [N, row_bytes] -> (codes uint8 [N, K], s and b fp32 [N, K / (128 / pairs)] rounded up)."""
    n = packed.shape[0]
    cb = 16 * bits
    nsb = -(-in_features // SUPER_BLOCK)
    sb = packed.reshape(n, nsb, cb + 8 * pairs)
    body = sb[..., :cb]
    if bits == 4:
        lo, hi = body & 0x0F, body >> 4
        q = torch.stack([lo.reshape(n, nsb, 4, 16), hi.reshape(n, nsb, 4, 16)], dim=3)
    else:
        q = body.reshape(n, nsb, 2, 4, 16).permute(0, 1, 3, 2, 4)
    codes = q.reshape(n, nsb * SUPER_BLOCK)[:, :in_features]
    sbf = sb[..., cb:].contiguous().view(torch.float32)  # [n, nsb, 2 * pairs]
    return codes, sbf[..., :pairs].reshape(n, -1), sbf[..., pairs:].reshape(n, -1)


def dequantize(packed: torch.Tensor, in_features: int, bits: int, pairs: int) -> torch.Tensor:
    """float32 [N, K]: s * q + b."""
    codes, s, b = unpack(packed, in_features, bits, pairs)
    span = SUPER_BLOCK // pairs
    n, total = codes.shape[0], s.shape[1] * span
    q = F.pad(codes, (0, total - in_features)).to(torch.float32).reshape(n, -1, span)
    return (q * s.unsqueeze(-1) + b.unsqueeze(-1)).reshape(n, total)[:, :in_features]


_CHUNK_ELEMENTS = 1 << 24  # float32 elements dequantized at a time (64 MB)


def qmatmul_affine(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int,
                   pairs: int, out_f32: bool = False) -> torch.Tensor:
    """The torch reference of ``qmatmul_affine``: ``x @ W.T + bias`` with W dequantized a block of rows at a
    time, in fp32; the result in x's dtype (fp32 with `out_f32`)."""
    k = x.shape[-1]
    xf = x.reshape(-1, k).to(torch.float32)
    n = packed.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, k))
    y = torch.empty(xf.shape[0], n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        y[:, r0:r1] = F.linear(xf, dequantize(packed[r0:r1], k, bits, pairs))
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = y.reshape(*x.shape[:-1], n)
    return y if out_f32 else y.to(x.dtype)
