"""GGML block quantization (llama.cpp's formats): ISQ types q4_0 ... q8k, and the types of GGUF
files we only dequantize (i-quants, TQ1_0/TQ2_0, MXFP4: `DEQUANT_ONLY_TYPES`, ``isq=False``).

Weights are held as the raw llama.cpp block bytes (``qweight``: uint8 [out, row_bytes]), so a
row quantized here is a valid GGUF tensor row of that type (``formats``). The forward is the op
``qmatmul_<type>``: native kernels claim it where they can run (the ``cpu_quant`` plugin); this
plugin registers the torch reference of every type (dequantize, then matmul), which is what
the kernels are tested against and what the types without a native kernel run on.

``mxfp4_checkpoint.py`` loads MXFP4 checkpoints (``quant_method: "mxfp4"``, GPT-OSS's expert
tensors ``*_blocks`` / ``*_scales``) as GGML ``mxfp4`` layers (docs/prequantized.md).

Registration only: no torch import here.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec, QuantizerSpec

METHOD = "mistralrs_plugins.quant.ggml.method:GgmlLinearMethod"
UQFF_FORMAT = 0  # UQFF records of GGML blocks (mistral.rs QuantizedSerdeType::Gguf)

# name: (bits per weight, --isq shorthand on cpu/cuda, sensitive-tensor type, shape fallback, devices)
# bits per weight = block bytes * 8 / block elements. Fallbacks follow llama.cpp's quantizer
# (a k-quant needs in_features % 256 == 0): q2k/q3k -> q4_0, q4k -> q5_0, q5k -> q5_1, q6k -> q8_0.
TYPES: dict[str, tuple[float, int | None, str, str | None, tuple[str, ...]]] = {
    "q4_0": (4.5, None, "q6k", None, ("cpu", "cuda")),
    "q4_1": (5.0, None, "q6k", None, ("cpu", "cuda")),
    "q5_0": (5.5, None, "q8_0", None, ("cpu", "cuda")),
    "q5_1": (6.0, None, "q8_0", None, ("cpu", "cuda")),
    "q8_0": (8.5, 8, "q8_0", None, ("cpu", "cuda")),
    "q8_1": (9.0, None, "q8_0", None, ("cpu",)),
    "q2k": (2.625, 2, "q6k", "q4_0", ("cpu", "cuda")),
    "q3k": (3.4375, 3, "q6k", "q4_0", ("cpu", "cuda")),
    "q4k": (4.5, 4, "q6k", "q5_0", ("cpu", "cuda")),
    "q5k": (5.5, 5, "q8_0", "q5_1", ("cpu", "cuda")),
    "q6k": (6.5625, 6, "q8_0", "q8_0", ("cpu", "cuda")),
    "q8k": (9.125, None, "q8_0", "q8_0", ("cpu",)),
}


# Types whose blocks GGUF files hold and we dequantize but never quantize to (they need llama.cpp's
# importance-matrix lattice searches): name (the GGUF spelling, lower case): (bits per weight, ggml
# type id, block size). They load as they are (`load_ggml`) and run the reference path (dequantize,
# then matmul); `--isq` does not offer them. Block layouts and tables: `iquants`, `iq_tables`.
DEQUANT_ONLY_TYPES: dict[str, tuple[float, int, int]] = {
    "iq1_s": (1.5625, 19, 256),
    "iq1_m": (1.75, 29, 256),
    "tq1_0": (1.6875, 34, 256),
    "iq2_xxs": (2.0625, 16, 256),
    "tq2_0": (2.0625, 35, 256),
    "iq2_xs": (2.3125, 17, 256),
    "iq2_s": (2.5625, 22, 256),
    "iq3_xxs": (3.0625, 18, 256),
    "iq3_s": (3.4375, 21, 256),
    "iq4_xs": (4.25, 23, 256),
    "mxfp4": (4.25, 39, 32),
    "iq4_nl": (4.5, 20, 32),
}


# GGML tensor type ids (ggml.h `enum ggml_type`; a GGUF tensor's type field).
GGML_TYPE_IDS: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q8_1": 9,
    "q2k": 10, "q3k": 11, "q4k": 12, "q5k": 13, "q6k": 14, "q8k": 15,
    **{name: type_id for name, (_bpw, type_id, _block) in DEQUANT_ONLY_TYPES.items()},
}


def _aliases(name: str) -> tuple[str, ...]:
    # q4k is also spelled q4_k (GGUF) ; upper case is handled by the case-insensitive lookup
    return (f"{name[:-1]}_k",) if name.endswith("k") else ()


def _dequant_only_aliases(name: str) -> tuple[str, ...]:
    # iq2_xxs is also spelled iq2xxs (as q4_k is q4k); tq1_0, tq2_0 and mxfp4 have one spelling
    return (name.replace("_", ""),) if name.startswith("iq") else ()


@hookimpl
def register_quantizers(register):
    for name, (bpw, shorthand, sensitive, fallback, devices) in TYPES.items():
        register(QuantizerSpec(
            name=name,
            method=METHOD,
            aliases=_aliases(name),
            isq=True,
            bits_per_weight=bpw,
            shorthand=shorthand,
            shorthand_devices=("cpu", "cuda") if shorthand is not None else (),
            sensitive=sensitive,
            fallback=fallback,
            devices=devices,
            ggml_type=GGML_TYPE_IDS[name],
            uqff_format=UQFF_FORMAT,
            description=f"GGML {name} blocks ({bpw} bits per weight)",
        ))
    for name, (bpw, type_id, block) in DEQUANT_ONLY_TYPES.items():
        register(QuantizerSpec(
            name=name,
            method=METHOD,
            aliases=_dequant_only_aliases(name),
            isq=False,
            bits_per_weight=bpw,
            devices=("cpu", "cuda", "mps"),
            ggml_type=type_id,
            uqff_format=UQFF_FORMAT,
            description=f"GGML {name} blocks of {block} ({bpw} bits per weight), from GGUF files; "
                        "dequantize-only (reference dequantize-then-matmul path)",
        ))
    register(QuantizerSpec(
        name="mxfp4_checkpoint",
        method="mistralrs_plugins.quant.ggml.mxfp4_checkpoint:Mxfp4CheckpointMethod",
        isq=False,
        checkpoint_formats=("mxfp4",),
        devices=("cpu", "cuda", "mps"),
        description="MXFP4 checkpoints (quant_method mxfp4: blocks + e8m0 scales per 32 weights; GPT-OSS's stacked "
                    "expert tensors *_blocks / *_scales split per expert); re-laid out as GGML mxfp4 blocks",
    ))


@hookimpl
def register_kernels(register):
    for name in (*TYPES, *DEQUANT_ONLY_TYPES):
        register(KernelSpec(
            name="torch",
            op=f"qmatmul_{name}",
            impl=f"mistralrs_plugins.quant.ggml.reference:qmatmul_{name}",
            devices=("cpu", "cuda", "mps"),
            priority=0,
            reference=True,
            description=f"torch reference: dequantize {name}, then matmul in fp32",
        ))
    register(KernelSpec(
        name="torch",
        op="moe_experts_ggml",
        impl="mistralrs_plugins.quant.ggml.reference:moe_experts_ggml",
        devices=("cpu", "cuda", "mps"),
        priority=0,
        reference=True,
        description="torch reference: a loop over GGML-block experts, each matmul the qmatmul reference",
    ))
    register(KernelSpec(
        name="torch",
        op="ggml_interleave",
        impl="mistralrs_plugins.quant.ggml.interleave:interleave",
        devices=("cpu", "cuda", "mps"),
        priority=0,
        reference=True,
        description="torch reference: interleave(qtype, canonical blocks) -> blocks of 8 rows side by side",
    ))
    register(KernelSpec(
        name="torch",
        op="ggml_quantize",
        impl="mistralrs_plugins.quant.ggml.formats:quantize",
        devices=("cpu", "cuda", "mps"),
        priority=0,
        reference=True,
        description="torch reference: quantize(qtype, weight) -> GGML block bytes, vectorized torch (bit-exact with llama.cpp)",
    ))
