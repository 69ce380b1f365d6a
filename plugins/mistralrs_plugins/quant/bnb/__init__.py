"""bitsandbytes checkpoints (``quantization_config.quant_method: "bitsandbytes"``): 4-bit nf4/fp4
with float or nested (double-quantized) block scales, and LLM.int8; loaded as published, run on
the reference path. ``method.py`` says what is stored.

Registration only: no torch import here."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import QuantizerSpec


@hookimpl
def register_quantizers(register):
    register(QuantizerSpec(
        name="bnb",
        method="mistralrs_plugins.quant.bnb.method:BnbMethod",
        isq=False,
        checkpoint_formats=("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"),
        devices=("cpu", "cuda", "mps"),
        description="bitsandbytes checkpoints: nf4/fp4 (nested absmax too) and int8; reference path",
    ))
