"""AFQ: MLX-style affine group quantization (ISQ types afq2, afq3, afq4, afq6, afq8).

Each group of 64 consecutive weights along ``in_features`` (mistral.rs's ISQ group size) stores
a 16-bit scale and bias and 2/3/4/6/8-bit codes, w = q * scale + bias; ``method.py`` says
exactly what is stored. These are the ``--isq N`` shorthands on Metal (``mps``), as in mistral.rs.
Sensitive tensors (token embeddings, LM head) are promoted afq2/3/4 -> afq6 and afq6/8 -> afq8.
A layer whose ``in_features`` is not a multiple of 64 stays unquantized (as mistral.rs does).

Registration only: no torch import here.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import QuantizerSpec

METHOD = "mistralrs_plugins.quant.afq.method:AfqLinearMethod"
GROUP_SIZE = 64  # mistral.rs: AfqGroupSize::default() for ISQ

# bits -> sensitive-tensor type (mistral.rs IsqType::promote_for_sensitive_tensor)
TYPES = {2: "afq6", 3: "afq6", 4: "afq6", 6: "afq8", 8: "afq8"}


@hookimpl
def register_quantizers(register):
    for bits, sensitive in TYPES.items():
        # codes + one scale and one bias per group of 64: 16-bit as published; afq4/afq8 run from the affine
        # layout of the native kernels, which holds them in fp32 (UQFF files keep them 16-bit)
        kernel_layout = bits in (4, 8)
        bpw = bits + 2 * (32 if kernel_layout else 16) / GROUP_SIZE
        register(QuantizerSpec(
            name=f"afq{bits}",
            method=METHOD,
            isq=True,
            bits_per_weight=bpw,
            shorthand=bits,
            shorthand_devices=("mps",),
            sensitive=sensitive,
            fallback=None,
            devices=("cpu", "cuda", "mps"),
            uqff_format=4,  # mistral.rs QuantizedSerdeType::Afq
            description=(f"MLX affine {bits}-bit, group {GROUP_SIZE}, "
                         + ("native affine kernels, fp32 scale+bias in memory" if kernel_layout
                            else "16-bit scale+bias, reference matmul") + f" ({bpw:g} bits per weight)"),
        ))
    register(QuantizerSpec(
        name="mlx_afq",
        method="mistralrs_plugins.quant.afq.checkpoint:AfqCheckpointMethod",
        isq=False,
        checkpoint_formats=("afq", "mlx"),
        devices=("cpu", "cuda", "mps"),
        description="MLX / AFQ checkpoints (config quantization: bits + group_size; weight, scales, biases), "
                    "token embeddings included; the AFQ reference path",
    ))
