"""Native AVX2 and AVX-512 VNNI quantized matmuls for GGML block formats (llama.cpp's q4_0, q8_0, q4_K, q5_K,
q6_K).

Registration only: importing this module is cheap (no torch, no compiler). The C++ extension is
built lazily on the first call of an op (see `ops`, and `kernels.native_build` for the build and
failure policy), cached under the platformdirs user cache; when it cannot be built the ops fall
back to the torch reference (registered by the GGML quantizer plugin) for the rest of the process.

Ops (all named ``avx2_q8``; they claim ``cpu`` only on x86-64 with avx2, fma and f16c):
``qmatmul_q4_0``, ``qmatmul_q8_0``, ``qmatmul_q4k``, ``qmatmul_q5k``, ``qmatmul_q6k`` —
``(x[M, K], qweight uint8[N, row_bytes], bias[N] | None, *, out_f32=False) -> y[M, N]``: the rows of
x are quantized to 8-bit blocks as llama.cpp does (q8_0, or q8_K for the k-quants), then int8 dot
products per block, scaled in fp32. Each row's result is bit-identical whatever else is in the batch.

The same ops named ``avx512_vnni`` (priority 20, above ``avx2_q8``; they claim ``cpu`` only where the CPU also
has avx512f, avx512bw, avx512vl and avx512_vnni): the same extension and activation quantization, 512-bit
``vpdpbusd`` tiles (``qmatmul_avx512.cpp``, compiled for AVX-512 by a pragma and called only on such CPUs, so
the one library still loads on AVX2-only CPUs). The k-quants give the AVX2 results bit for bit; q4_0/q8_0 agree
with them to fp32 rounding (another float accumulation order), and are batch-invariant in the same way.
q4_0, q4_K and q5_K layers are kept interleaved by 8 rows for both (``quant/ggml/interleave.py``; the ops carry
``interleave = 8``), where the two instruction sets' tiles give the same results bit for bit; on AVX2 CPUs with
AVX-VNNI (``avx_vnni``, no AVX-512) the AVX2 ops run those tiles with its ``vpdpbusd``, again bit for bit.

``qmatmul_affine`` (both instruction sets, same names and priorities): ``(x, packed, bias, *, bits, pairs,
out_f32=False)`` for the affine group layout of ``quant/affine/layout.py`` (``w = s * q + b``, 4- or 8-bit
codes: AWQ, asymmetric GPTQ, MLX/AFQ), against the same q8_0 activations.

``linear_fp8`` (named ``avx2``, priority 10): ``(x, weight uint8 E4M3 [N, K], scale, bias, *, block=None,
out_f32=False)``, FP8 weights with block scales (FP8 checkpoints, ``--isq fp8``) in fp32 arithmetic, the
tiles and schedules of ``linear_bf16`` with another weight widening; ``linear_int8`` (int8 weights:
bitsandbytes LLM.int8) and ``linear_lut4`` (4-bit codes and a 16-value table: bitsandbytes NF4/FP4) the same.

Also ``linear_bf16`` (named ``avx2``, priority 5: above the torch reference, below cpu_native's AVX-512-BF16
kernel, which wins where it runs): ``(x[M, K], weight bf16[N, K], bias, *, out_f32=False)`` with the weights
widened to fp32 in registers and FMA accumulation, batch-invariant.

Set ``MISTRALRS_NO_NATIVE_KERNELS=1`` to never claim a device (and never build).
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec
from mistralrs_plugins.kernels.native_build import DISABLE_ENV, cpu_flags, is_x86_64, native_disabled

__all__ = ["DISABLE_ENV", "FORMATS", "LINEAR_BF16_PRIORITY", "VNNI_PRIORITY", "has_avx2", "has_avx512_vnni", "has_avx_vnni",
           "register_kernels", "supports_avx2", "supports_avx512_vnni"]

# op suffix -> (block elements, block bytes, activation blocks, C++ qtype id)
FORMATS: dict[str, tuple[int, int, str, int]] = {
    "q4_0": (32, 18, "q8_0", 0),
    "q8_0": (32, 34, "q8_0", 1),
    "q4k": (256, 144, "q8_K", 2),
    "q5k": (256, 176, "q8_K", 3),
    "q6k": (256, 210, "q8_K", 4),
}

# Above the torch reference (0), below cpu_native's AVX-512-BF16 linear_bf16 (10).
LINEAR_BF16_PRIORITY = 5
# The AVX-512 VNNI qmatmul tiles: above the AVX2 ones (10).
VNNI_PRIORITY = 20


def has_avx2() -> bool:
    """x86-64 with the instructions the kernels are compiled for (avx2, fma, f16c)."""
    return is_x86_64() and {"avx2", "fma", "f16c"} <= cpu_flags()


def supports_avx2(device: str = "cpu", **_context: object) -> bool:
    return device == "cpu" and not native_disabled() and has_avx2()


def has_avx512_vnni() -> bool:
    """has_avx2() and the AVX-512 subsets the VNNI tiles are compiled for (f, bw, vl, vnni)."""
    return has_avx2() and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu_flags()


def has_avx_vnni() -> bool:
    """has_avx2() and AVX-VNNI (VEX ``vpdpbusd``, Intel client cores from Alder Lake on), which the AVX2 ops'
    interleaved tiles use where it is (the same results bit for bit)."""
    return has_avx2() and "avx_vnni" in cpu_flags()


def supports_avx512_vnni(device: str = "cpu", **_context: object) -> bool:
    return device == "cpu" and not native_disabled() and has_avx512_vnni()


@hookimpl
def register_kernels(register):
    for name, (elems, nbytes, act, _qtype) in FORMATS.items():
        register(KernelSpec(
            name="avx2_q8",
            op=f"qmatmul_{name}",
            impl=f"mistralrs_plugins.kernels.cpu_quant.ops:qmatmul_{name}",
            devices=("cpu",),
            priority=10,
            supports=supports_avx2,
            description=(f"AVX2 {name} x {act} int8 GEMV/GEMM ({elems}-element blocks of {nbytes} bytes), "
                         "batch-invariant; built on first use"),
        ))
        register(KernelSpec(
            name="avx512_vnni",
            op=f"qmatmul_{name}",
            impl=f"mistralrs_plugins.kernels.cpu_quant.ops:qmatmul_{name}_vnni",
            devices=("cpu",),
            priority=VNNI_PRIORITY,
            supports=supports_avx512_vnni,
            description=(f"AVX-512 VNNI {name} x {act} int8 GEMV/GEMM (vpdpbusd), "
                         "batch-invariant; built on first use"),
        ))
    register(KernelSpec(
        name="native",
        op="ggml_interleave",
        impl="mistralrs_plugins.kernels.cpu_quant.ops:ggml_interleave",
        devices=("cpu",),
        priority=10,
        supports=supports_avx2,
        description="canonical GGML blocks -> interleaved by 8 rows (q4_0, q4_K, q5_K; the tiles' layout), groups on "
                    "the kernels' pool; built on first use",
    ))
    register(KernelSpec(
        name="avx2_q8",
        op="qmatmul_affine",
        impl="mistralrs_plugins.kernels.cpu_quant.ops:qmatmul_affine",
        devices=("cpu",),
        priority=10,
        supports=supports_avx2,
        description="AVX2 affine groups (s * q + b, 4/8-bit codes: AWQ, GPTQ, AFQ) x q8_0 int8 GEMV/GEMM, "
                    "batch-invariant; built on first use",
    ))
    register(KernelSpec(
        name="avx512_vnni",
        op="qmatmul_affine",
        impl="mistralrs_plugins.kernels.cpu_quant.ops:qmatmul_affine_vnni",
        devices=("cpu",),
        priority=VNNI_PRIORITY,
        supports=supports_avx512_vnni,
        description="AVX-512 VNNI affine groups (s * q + b, 4/8-bit codes) x q8_0 int8 GEMV/GEMM, "
                    "batch-invariant; built on first use",
    ))
    for op, what in (("linear_fp8", "FP8 E4M3"), ("linear_int8", "int8"),
                     ("linear_lut4", "4-bit table (NF4/FP4)")):
        register(KernelSpec(
            name="avx2",
            op=op,
            impl=f"mistralrs_plugins.kernels.cpu_quant.ops:{op}",
            devices=("cpu",),
            priority=10,
            supports=supports_avx2,
            description=f"AVX2/F16C {what} GEMV/GEMM with block scales, fp32 arithmetic (weights widened in "
                        "registers), batch-invariant; built on first use",
        ))
    register(KernelSpec(
        name="avx2",
        op="linear_bf16",
        impl="mistralrs_plugins.kernels.cpu_quant.ops:linear_bf16",
        devices=("cpu",),
        priority=LINEAR_BF16_PRIORITY,
        supports=supports_avx2,
        description="AVX2/FMA bf16 GEMV/GEMM in fp32 (bf16 weights widened in registers), batch-invariant; "
                    "built on first use",
    ))
