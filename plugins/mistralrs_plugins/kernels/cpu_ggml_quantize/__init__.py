"""Native GGML block quantization for in-situ quantization (the op ``ggml_quantize``).

Registration only: importing this module is cheap (no torch, no compiler). The C++ extension
(``quantize.cpp``) is built lazily on the first call (see `ops`, and `kernels.native_build` for the build
and failure policy), cached under the platformdirs user cache; when it cannot be built the op falls back
to the torch reference (``formats.quantize``, registered by the GGML quantizer plugin) for the rest of the
process.

Op ``ggml_quantize(qtype, weight[rows, cols]) -> uint8 [rows, row_bytes]``: llama.cpp's reference quantizers
(``quantize_row_*_ref``) ported to C++, bit-exact with them and with the torch reference, for all twelve
types (q4_0 q4_1 q5_0 q5_1 q8_0 q8_1 q2k q3k q4k q5k q6k q8k); fp32/bf16/fp16 weights with any strides,
rows in parallel on torch's thread count. Scalar C++ (the compiler vectorizes it; an AVX2 clone is picked at
run time on x86-64), so it builds and runs on any x86-64 or aarch64 CPU.

Set ``MISTRALRS_NO_NATIVE_KERNELS=1`` to never claim a device (and never build).
"""

from __future__ import annotations

import platform

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec
from mistralrs_plugins.kernels.native_build import DISABLE_ENV, native_disabled

__all__ = ["DISABLE_ENV", "TYPES", "native_arch", "register_kernels", "supports_native"]

# GGML type name -> (block values, block bytes, C++ type id)
TYPES: dict[str, tuple[int, int, int]] = {
    "q4_0": (32, 18, 0),
    "q4_1": (32, 20, 1),
    "q5_0": (32, 22, 2),
    "q5_1": (32, 24, 3),
    "q8_0": (32, 34, 4),
    "q8_1": (32, 36, 5),
    "q2k": (256, 84, 6),
    "q3k": (256, 110, 7),
    "q4k": (256, 144, 8),
    "q5k": (256, 176, 9),
    "q6k": (256, 210, 10),
    "q8k": (256, 292, 11),
}


def native_arch() -> bool:
    """A CPU the library is built for: x86-64 or aarch64 (no particular instruction set extension needed)."""
    return platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")


def supports_native(device: str = "cpu", **_context: object) -> bool:
    return device == "cpu" and not native_disabled() and native_arch()


@hookimpl
def register_kernels(register):
    register(KernelSpec(
        name="native",
        op="ggml_quantize",
        impl="mistralrs_plugins.kernels.cpu_ggml_quantize.ops:ggml_quantize",
        devices=("cpu",),
        priority=10,
        supports=supports_native,
        description="C++ port of llama.cpp's reference GGML quantizers (all 12 types, bit-exact), "
                    "rows on OpenMP threads; built on first use",
    ))
