"""Triton gated activations for CUDA: ``silu_and_mul`` (SwiGLU) and ``gelu_and_mul`` (GeGLU, tanh or erf).

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernels
claim ``cuda``). The kernels are in `kernels`: one pass over ``x = [gate | up]``, fp32 math.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {
    "silu_and_mul": "SwiGLU silu(gate) * up (fp32 math)",
    "gelu_and_mul": "GeGLU gelu(gate) * up, tanh or erf (fp32 math)",
}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_activation.kernels", OPS)
