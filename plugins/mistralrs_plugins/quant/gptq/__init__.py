"""GPTQ checkpoints (``quantization_config.quant_method: "gptq"``), loaded as published: symmetric
4- and 8-bit layers with columns in order become GGML q4_0 / q8_0 blocks exactly (the fast
kernels), the rest run the reference path. ``method.py`` says what is stored.

Registration only: no torch import here."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import QuantizerSpec


@hookimpl
def register_quantizers(register):
    register(QuantizerSpec(
        name="gptq",
        method="mistralrs_plugins.quant.gptq.method:GptqLinearMethod",
        isq=False,
        checkpoint_formats=("gptq",),
        devices=("cpu", "cuda", "mps"),
        description="GPTQ checkpoints (2/4/8-bit, groups, desc_act, v1/v2 zero points); symmetric 4/8-bit "
                    "layers run as q4_0/q8_0 blocks",
    ))
