"""bitsandbytes checkpoints (``quantization_config.quant_method: "bitsandbytes"``): 4-bit nf4/fp4
with float or nested (double-quantized) block scales, and LLM.int8; loaded as published, run by the
``linear_lut4`` / ``linear_int8`` ops (native on AVX2 CPUs: kernels/cpu_quant; their torch references are
registered here). ``method.py`` says what is stored.

Registration only: no torch import here."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec, QuantizerSpec


@hookimpl
def register_quantizers(register):
    register(QuantizerSpec(
        name="bnb",
        method="mistralrs_plugins.quant.bnb.method:BnbMethod",
        isq=False,
        checkpoint_formats=("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"),
        devices=("cpu", "cuda", "mps"),
        description="bitsandbytes checkpoints: nf4/fp4 (nested absmax too) and int8",
    ))


@hookimpl
def register_kernels(register):
    for op, what in (("linear_lut4", "4-bit codes looked up in a 16-value table"), ("linear_int8", "int8 weights")):
        register(KernelSpec(
            name="torch",
            op=op,
            impl=f"mistralrs_plugins.quant.bnb.method:{op}",
            devices=("cpu", "cuda", "mps"),
            priority=0,
            reference=True,
            description=f"torch reference: dequantize {what} with their block scales, then matmul in fp32",
        ))
