"""Triton dequantize-matmuls of GGML blocks for CUDA: ``qmatmul_q4_0``, ``qmatmul_q8_0``, ``qmatmul_q2k``,
``qmatmul_q3k``, ``qmatmul_q4k``, ``qmatmul_q5k``, ``qmatmul_q6k``.

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernels
claim ``cuda``). The kernels are in `kernels`: tiles of the canonical block bytes (llama.cpp's layout,
as GGUF and UQFF store them; nothing repacked) dequantized in registers and multiplied in fp32, the
arithmetic of the GGML quantizer plugin's torch reference (dequantize, then an fp32 matmul).
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {
    "qmatmul_q4_0": "q4_0 dequantize-matmul (32-element blocks of 18 bytes, fp32 tiles)",
    "qmatmul_q8_0": "q8_0 dequantize-matmul (32-element blocks of 34 bytes, fp32 tiles)",
    "qmatmul_q4k": "q4_K dequantize-matmul (256-element super-blocks of 144 bytes, fp32 tiles)",
    "qmatmul_q5k": "q5_K dequantize-matmul (256-element super-blocks of 176 bytes, fp32 tiles)",
    "qmatmul_q6k": "q6_K dequantize-matmul (256-element super-blocks of 210 bytes, fp32 tiles)",
    "qmatmul_q2k": "q2_K dequantize-matmul (256-element super-blocks of 84 bytes, fp32 tiles)",
    "qmatmul_q3k": "q3_K dequantize-matmul (256-element super-blocks of 110 bytes, fp32 tiles)",
}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_quant.kernels", OPS)
