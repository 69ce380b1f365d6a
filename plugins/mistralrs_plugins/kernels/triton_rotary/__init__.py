"""Triton rotary embedding for CUDA: ``rotary`` (NeoX halves or GPT-J interleaved pairs, partial rotary).

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernel
claims ``cuda``). The kernel is `kernels.rotary`: one program per token, all heads at once, fp32 math.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {"rotary": "rotary embedding (NeoX or GPT-J pairs, partial rotary; one program per token, fp32 math)"}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_rotary.kernels", OPS)
