"""Triton gated activations over ``x[..., 2I] = [gate | up]`` -> ``[..., I]``.

As the reference (`mistralrs.nn.torch_ops`) computes them with torch: the activation of gate in fp32,
rounded to x's dtype, times up in fp32, rounded again (torch's two ops round twice; so do these).
Grid: rows x blocks of I. Anything the kernels do not take goes to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels.triton_support import runs_here

BLOCK = 1024
GELU_MODES = {"none": 0, "tanh": 1}


@triton.jit
def _gated_kernel(x_ptr, y_ptr, x_stride, inter, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:  # silu
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:  # gelu, erf
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
    a = a.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * inter + cols, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


def _gated(x: torch.Tensor, act: int) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and inter:
        block = min(BLOCK, triton.next_power_of_2(inter))
        _gated_kernel[(rows, triton.cdiv(inter, block))](x2, y, x2.stride(0), inter, ACT=act, BLOCK=block)
    return y


def _takes(x: torch.Tensor) -> bool:
    return runs_here(x) and x.dim() >= 1 and x.shape[-1] % 2 == 0 and x.dtype.is_floating_point


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not _takes(x):
        return torch_ops.silu_and_mul(x)
    return _gated(x, 0)


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    if not _takes(x) or approximate not in GELU_MODES:
        return torch_ops.gelu_and_mul(x, approximate)
    return _gated(x, 1 + GELU_MODES[approximate])
