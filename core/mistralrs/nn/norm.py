"""Normalisation layers.

`RMSNorm` calls the registered ``rms_norm`` kernel, which computes in float32 and casts back
to the input dtype once (HF's Gemma order). HF's Llama-style RMSNorm casts the normalised
activations back *before* multiplying by the weight; in fp32 the two agree exactly, in bf16/f16
they differ by at most one rounding of the output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.kernels import lookup_kernel


class RMSNorm(nn.Module):
    """y = x / rms(x) * w  (or * (1 + w) with `add_unit_offset`, Gemma)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        add_unit_offset: bool = False,
        device: Any = None,
        registry: Any = None,
    ) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.add_unit_offset = bool(add_unit_offset)
        self.weight = nn.Parameter(torch.empty(self.hidden_size), requires_grad=False)
        self._kernel = lookup_kernel("rms_norm", device or "cpu", registry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self.weight, self.eps, self.add_unit_offset)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, add_unit_offset={self.add_unit_offset}"


class LayerNorm(nn.Module):
    """Standard LayerNorm (weight, optional bias) in the input dtype, as torch.nn.LayerNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, bias: bool = True) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.hidden_size), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.hidden_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"
