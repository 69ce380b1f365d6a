"""Torch reference ops. Plain, readable, and what every faster kernel is compared against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add_unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm computed in float32 (as HF does), cast back to x's dtype.
    `add_unit_offset` is Gemma's ``x * (1 + w)`` variant."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float()
    if add_unit_offset:
        w = w + 1.0
    return (xf * w).to(dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
           interleaved: bool = False) -> torch.Tensor:
    """Apply rotary embeddings to x[T, H, D] with cos/sin[T, rotary_dim/2]; dims beyond
    `rotary_dim` pass through (partial rotary). `interleaved` rotates pairs (GPT-J style)
    instead of halves (NeoX style)."""
    d = rotary_dim or x.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    cos = cos[:, None, :].to(torch.float32)
    sin = sin[:, None, :].to(torch.float32)
    rf = rot.float()
    if interleaved:
        x1, x2 = rf[..., 0::2], rf[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        x1, x2 = rf[..., : d // 2], rf[..., d // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = out.to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU: gelu(gate) * up for x = [gate | up] along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias): the reference for the bf16 decode GEMV kernels."""
    return F.linear(x, weight, bias)
