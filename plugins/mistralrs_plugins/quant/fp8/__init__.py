"""FP8 ISQ types, as mistral.rs has them: ``fp8`` (alias ``f8e4m3``) and ``f8q8``.

- ``fp8``: the weight cast to FP8 E4M3 with one float32 scale per tensor (mistral.rs's ISQ
  ``FP8Linear``; the 128x128 block scales of HF FP8 checkpoints are another loader, not ISQ).
- ``f8q8``: int8 blocks of 32 weights with the block scale itself stored as FP8 E4M3 (33 bytes
  per 32 weights; mistral.rs's ``F8Q8Linear``, CPU-only). The name is not "8-bit activations":
  the forward dequantizes the weight.

``method.py`` says exactly what is stored. ``checkpoint.py`` loads FP8 checkpoints as published
(``quant_method: "fp8"``, block-wise ``weight_scale_inv``: docs/prequantized.md). No shape constraints (f8q8 pads the flattened weight
to whole blocks, as mistral.rs does). Sensitive tensors keep the type (mistral.rs does not
promote FP8 types).

Registration only: no torch import here.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec, QuantizerSpec


@hookimpl
def register_quantizers(register):
    register(QuantizerSpec(
        name="fp8",
        method="mistralrs_plugins.quant.fp8.method:Fp8LinearMethod",
        aliases=("f8e4m3",),
        isq=True,
        bits_per_weight=8.0,  # + one float32 per tensor
        sensitive=None,
        fallback=None,
        devices=("cpu", "cuda", "mps"),
        uqff_format=3,  # mistral.rs QuantizedSerdeType::Fp8
        description="FP8 E4M3 weights with one float32 scale per tensor (8 bits per weight)",
    ))
    register(QuantizerSpec(
        name="f8q8",
        method="mistralrs_plugins.quant.fp8.method:F8Q8LinearMethod",
        isq=True,
        bits_per_weight=8.25,  # 32 int8 + one FP8 scale per block of 32
        sensitive=None,
        fallback=None,
        devices=("cpu",),
        uqff_format=5,  # mistral.rs QuantizedSerdeType::F8Q8
        description="int8 blocks of 32 with an FP8 E4M3 block scale, 33 bytes per 32 weights (8.25 bits per weight)",
    ))
    register(QuantizerSpec(
        name="fp8_checkpoint",
        method="mistralrs_plugins.quant.fp8.checkpoint:Fp8CheckpointMethod",
        isq=False,
        checkpoint_formats=("fp8",),
        devices=("cpu", "cuda", "mps"),
        description="FP8 E4M3 checkpoints (quant_method fp8: weight_block_size blocks or per tensor, "
                    "weight_scale_inv); reference path",
    ))


@hookimpl
def register_kernels(register):
    register(KernelSpec(
        name="torch",
        op="linear_fp8",
        impl="mistralrs_plugins.quant.fp8.method:linear_fp8",
        devices=("cpu", "cuda", "mps"),
        priority=0,
        reference=True,
        description="torch reference: dequantize E4M3 weights with their block scales, then matmul in fp32",
    ))
