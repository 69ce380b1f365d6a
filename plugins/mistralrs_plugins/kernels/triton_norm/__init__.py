"""Triton RMSNorm kernels for CUDA: ``rms_norm`` and ``fused_add_rms_norm`` (the residual add fused in).

Registration only: no torch or triton import here (see `kernels.triton_support` for when the kernels
claim ``cuda`` and why they do not). The kernels are in `kernels`; one program per row, fp32 math, one
rounding to the output dtype, the same arithmetic as `mistralrs.nn.torch_ops`.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {
    "rms_norm": "RMSNorm (one program per row, fp32 math)",
    "fused_add_rms_norm": "residual add + RMSNorm in one pass (fp32 math)",
}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_norm.kernels", OPS)
