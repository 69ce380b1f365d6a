"""Native CPU kernels built on the user's machine (torch ``cpp_extension``).

Registration only: importing this module is cheap (no torch, no compiler). The C++ extension is
built lazily on the first call of an op (see `ops`), cached under the platformdirs user cache,
and when it cannot be built the op falls back to torch for the rest of the process.

Ops (all named ``avx512_bf16``; they claim ``cpu`` only on x86 with the ``avx512_bf16`` flag):
- ``linear_bf16``: ``y = x @ W^T (+ b)`` for bf16, fp32 accumulation with ``vdpbf16ps``, each row's
  result independent of the batch; ``out_f32=True`` writes fp32 (the LM head's logits).
- ``rms_norm``, ``silu_and_mul``, ``rotary``: the per-token ops of a decoder layer, fp32 math in one pass.
- ``paged_attention_decode``: decode attention that reads K/V in place through the block tables.
- ``paged_attention_prefill``: prefill chunks' attention, each new token a row of the decode kernel.

``linear_bf16`` named ``amx_bf16`` (priority 15, above the others; claims ``cpu`` only with ``amx_tile`` and
``amx_bf16`` too): the same op on AMX tiles (``linear_amx.cpp``), for layers whose K and N are multiples of 32;
the OS's permission for AMX tile data is asked once, and without it every call is the AVX-512-BF16 kernel.

``rms_norm``, ``silu_and_mul``, ``rotary``, ``paged_attention_decode`` and ``paged_attention_prefill`` named
``avx2`` (priority 5: above the
torch reference; claim ``cpu`` only on x86 with avx2/fma/f16c and without avx512_bf16): the same ops from a
library of their own (``decode_ops_avx2.cpp``), so that AVX2 CPUs skip the torch reference's many small ops
(its decode attention gathers K/V and takes ~0.4 ms a layer).

Set ``MISTRALRS_NO_NATIVE_KERNELS=1`` to never claim a device (and never build).
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec
from mistralrs_plugins.kernels.native_build import DISABLE_ENV, cpu_flags, is_x86_64, native_disabled

__all__ = ["DISABLE_ENV", "cpu_flags", "has_amx_bf16", "has_avx2_only", "has_avx512_bf16", "native_disabled",
           "register_kernels"]


def has_avx512_bf16() -> bool:
    return is_x86_64() and {"avx512f", "avx512bw", "avx512_bf16"} <= cpu_flags()


def supports_avx512_bf16(device: str = "cpu", **_context: object) -> bool:
    return device == "cpu" and not native_disabled() and has_avx512_bf16()


def has_avx2_only() -> bool:
    """x86-64 with avx2, fma and f16c but without avx512_bf16 (what the AVX2 library serves)."""
    return is_x86_64() and {"avx2", "fma", "f16c"} <= cpu_flags() and not has_avx512_bf16()


def supports_avx2_only(device: str = "cpu", **_context: object) -> bool:
    return device == "cpu" and not native_disabled() and has_avx2_only()


def has_amx_bf16() -> bool:
    """has_avx512_bf16() and the AMX tiles with bf16 dot products (Sapphire Rapids and later)."""
    return has_avx512_bf16() and {"amx_tile", "amx_bf16"} <= cpu_flags()


def supports_amx_bf16(device: str = "cpu", **_context: object) -> bool:
    return device == "cpu" and not native_disabled() and has_amx_bf16()


# Above the AVX-512-BF16 ops (10).
AMX_PRIORITY = 15


# op -> description; every op is a function of the same name in `ops`, in the one native build.
OPS = {
    "linear_bf16": "AVX-512-BF16 batch-invariant GEMV/GEMM (bf16, any rows; fp32 output for logits)",
    "rms_norm": "AVX-512 RMSNorm (bf16/fp32, fp32 math)",
    "silu_and_mul": "AVX-512 SwiGLU silu(gate) * up (bf16/fp32)",
    "rotary": "AVX-512 rotary embedding (bf16/fp32, NeoX or GPT-J pairs, partial rotary)",
    "paged_attention_decode": "AVX-512 decode attention reading the paged KV cache in place (bf16/fp32)",
    "paged_attention_prefill": "AVX-512 prefill attention: each new token a row of the decode kernel (causal, "
                               "paged KV read in place; bf16/fp32)",
}


# CPUs with AVX2 but not AVX-512-BF16: decode_ops_avx2.cpp (above the torch reference, 0).
AVX2_PRIORITY = 5
AVX2_OPS = {
    "rms_norm": "AVX2 RMSNorm (bf16/fp32, fp32 math)",
    "silu_and_mul": "AVX2 SwiGLU silu(gate) * up (bf16/fp32)",
    "rotary": "AVX2 rotary embedding (bf16/fp32, NeoX or GPT-J pairs, partial rotary)",
    "paged_attention_decode": "AVX2 decode attention reading the paged KV cache in place (bf16/fp32)",
    "paged_attention_prefill": "AVX2 prefill attention: each new token a row of the decode kernel (causal, "
                               "paged KV read in place; bf16/fp32)",
}


@hookimpl
def register_kernels(register):
    for op, description in OPS.items():
        register(KernelSpec(
            name="avx512_bf16",
            op=op,
            impl=f"mistralrs_plugins.kernels.cpu_native.ops:{op}",
            devices=("cpu",),
            priority=10,
            supports=supports_avx512_bf16,
            description=f"{description}; built on first use",
        ))
    for op, description in AVX2_OPS.items():
        register(KernelSpec(
            name="avx2",
            op=op,
            impl=f"mistralrs_plugins.kernels.cpu_native.ops:{op}_avx2",
            devices=("cpu",),
            priority=AVX2_PRIORITY,
            supports=supports_avx2_only,
            description=f"{description}; built on first use",
        ))
    register(KernelSpec(
        name="amx_bf16",
        op="linear_bf16",
        impl="mistralrs_plugins.kernels.cpu_native.ops:linear_bf16_amx",
        devices=("cpu",),
        priority=AMX_PRIORITY,
        supports=supports_amx_bf16,
        description="AMX bf16 tiles (tdpbf16ps) batch-invariant GEMV/GEMM for layers with K and N multiples of 32 "
                    "(others: the AVX-512-BF16 kernel); built on first use",
    ))
