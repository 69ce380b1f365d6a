"""HQQ: half-quadratic quantization (ISQ types hqq4, hqq8), as mistral.rs runs it for ISQ.

Groups of 64 weights (axis 0 of the flattened weight viewed as [64, out*in/64]) with a float32
scale and zero each, the zero refined by HQQ's proximal optimizer (10 steps for ISQ, lp-norm
0.7, beta 10, kappa 1.01); ``method.py`` says exactly what is stored. A layer with
``out*in % 64 != 0`` stays unquantized. Sensitive tensors (token embeddings, LM head) are not
promoted: mistral.rs keeps hqq4/hqq8 for them (``promote_for_sensitive_tensor`` leaves HQQ as is).

``checkpoint.py`` loads HQQ checkpoints as published (``quant_method: "hqq"``, transformers'
``HqqConfig``: 1-8 bits, axis 0 or 1; docs/prequantized.md).

Registration only: no torch import here.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import QuantizerSpec

METHOD = "mistralrs_plugins.quant.hqq.method:HqqLinearMethod"
GROUP_SIZE = 64  # mistral.rs ISQ_HQQ_GROUP_SIZE


@hookimpl
def register_quantizers(register):
    for bits in (4, 8):
        # codes + a float32 scale and a float32 zero per group of 64 (mistral.rs keeps them in f32)
        bpw = bits + 2 * 32 / GROUP_SIZE
        register(QuantizerSpec(
            name=f"hqq{bits}",
            method=METHOD,
            isq=True,
            bits_per_weight=bpw,
            shorthand=None,
            sensitive=None,
            fallback=None,
            devices=("cpu", "cuda", "mps"),
            uqff_format=2,  # mistral.rs QuantizedSerdeType::Hqq
            description=f"HQQ {bits}-bit, group {GROUP_SIZE}, f32 scale+zero ({bpw} bits per weight)",
        ))
    register(QuantizerSpec(
        name="hqq_checkpoint",
        method="mistralrs_plugins.quant.hqq.checkpoint:HqqCheckpointMethod",
        isq=False,
        checkpoint_formats=("hqq",),
        devices=("cpu", "cuda", "mps"),
        description="HQQ checkpoints (quant_method hqq, transformers' HqqConfig: W_q, scale, zero and hqq's meta "
                    "tensors; 1, 2, 3, 4, 5, 6, 8 bits, axis 0 or 1); the HQQ reference path",
    ))
