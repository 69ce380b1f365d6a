"""Triton RMSNorm: one program per row of ``x[..., H]``, the whole row in one block, fp32 math.

Same arithmetic as `mistralrs.nn.torch_ops.rms_norm`: ``x * rsqrt(mean(x^2) + eps) * w`` in fp32, one
rounding to x's dtype; the fused variant rounds ``x + residual`` to x's dtype first (as the reference's
add does) and writes it back as the new residual. Inputs the kernels do not take (autograd, a device
they cannot run on, rows wider than `MAX_BLOCK`) go to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels.triton_support import runs_here

MAX_BLOCK = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, x_stride, r_stride, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)  # rounded as the reference's add
        tl.store(h_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) / n_cols
    inv = 1.0 / tl.sqrt(ms + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = w + 1.0
    y = (xf * inv) * w
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            add_unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_cols = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    rows = x2.shape[0]
    if rows:
        r2 = _rows(residual) if residual is not None else x2
        block = triton.next_power_of_2(n_cols)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight.contiguous(), y, h if h is not None else y, x2.stride(0), r2.stride(0), n_cols, float(eps),
            HAS_RESIDUAL=residual is not None, UNIT_OFFSET=bool(add_unit_offset), BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return y, h


def _takes(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    return (runs_here(x, weight, *others) and x.shape[-1] <= MAX_BLOCK and weight.shape == (x.shape[-1],)
            and all(o.shape == x.shape for o in others) and x.dtype.is_floating_point)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add_unit_offset: bool = False) -> torch.Tensor:
    if not _takes(x, weight):
        return torch_ops.rms_norm(x, weight, eps, add_unit_offset)
    return _launch(x, None, weight, eps, add_unit_offset)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       add_unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if not _takes(x, weight, residual) or residual.dtype != x.dtype:
        return torch_ops.fused_add_rms_norm(x, residual, weight, eps, add_unit_offset)
    y, h = _launch(x, residual, weight, eps, add_unit_offset)
    assert h is not None
    return y, h
