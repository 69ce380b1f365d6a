"""AWQ checkpoints (``quantization_config.quant_method: "awq"``, the GEMM packing), loaded as
published (reference path; symmetric layers as q4_0). ``method.py`` says what is stored.

Registration only: no torch import here."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import QuantizerSpec


@hookimpl
def register_quantizers(register):
    register(QuantizerSpec(
        name="awq",
        method="mistralrs_plugins.quant.awq.method:AwqLinearMethod",
        isq=False,
        checkpoint_formats=("awq",),
        devices=("cpu", "cuda", "mps"),
        description="AWQ checkpoints (4-bit, GEMM packing, zero points); reference dequantize-then-matmul path",
    ))
