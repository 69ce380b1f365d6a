"""Triton dequantize-matmul of the affine group layout for CUDA: ``qmatmul_affine`` (AWQ, asymmetric GPTQ,
MLX/AFQ checkpoints, ``--isq afq4/afq8``).

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernel claims
``cuda``). The kernel is `kernels.qmatmul_affine`: tiles of the packed super-blocks (`quant/affine/layout`)
dequantized in registers, ``s * q + b``, and multiplied in fp32.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {"qmatmul_affine": "affine-group dequantize-matmul (4/8-bit codes, fp32 s and b per group; fp32 tiles)"}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_affine.kernels", OPS)
