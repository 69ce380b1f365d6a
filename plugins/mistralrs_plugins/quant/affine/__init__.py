"""The affine group layout shared by the formats whose weights are ``s * q + b`` per group (AWQ,
asymmetric GPTQ, MLX/AFQ, axis-1 HQQ): `layout` packs them once at load, and this plugin registers
the torch reference of ``qmatmul_affine`` (native kernels: ``kernels/cpu_quant``)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec


@hookimpl
def register_kernels(register):
    register(KernelSpec(
        name="torch",
        op="qmatmul_affine",
        impl="mistralrs_plugins.quant.affine.layout:qmatmul_affine",
        devices=("cpu", "cuda", "mps"),
        priority=0,
        reference=True,
        description="torch reference: dequantize affine groups (s * q + b), then matmul in fp32",
    ))
