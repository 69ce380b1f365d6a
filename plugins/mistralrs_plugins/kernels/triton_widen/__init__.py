"""Triton block-scaled widening linears for CUDA: ``linear_fp8`` (FP8 E4M3 checkpoints with
``weight_block_size`` scales, ``--isq fp8``), ``linear_int8`` (bitsandbytes LLM.int8), ``linear_lut4``
(bitsandbytes NF4/FP4).

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernels claim
``cuda``). The kernels are in `kernels`: the weights widened to fp32 in registers (E4M3 decoded with integer
operations, int8 converted, 4-bit codes looked up in the table), times their block's scale, fp32 tiles.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {
    "linear_fp8": "FP8 E4M3 linear with block scales (widened in registers, fp32 tiles)",
    "linear_int8": "int8 linear with block scales (widened in registers, fp32 tiles)",
    "linear_lut4": "4-bit table-lookup linear with block scales (NF4/FP4; fp32 tiles)",
}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_widen.kernels", OPS)
