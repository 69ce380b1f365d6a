"""Triton fused mixture-of-experts for CUDA: ``moe_experts`` (the experts of `nn.moe.SparseMoE` with stacked
plain weights: Mixtral, Qwen2/3-MoE, DeepSeek's routed experts) and ``moe_experts_ggml`` (the same experts as
GGML blocks: GGUF, UQFF, ``--isq q4k``...).

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernel claims
``cuda``). The kernel is `kernels.moe_experts`: the (token, expert) pairs sorted by expert into blocks, then
one grouped GEMM launch per projection over all experts.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {"moe_experts": "fused MoE (tokens sorted by expert, grouped GEMM over all experts per projection)",
       "moe_experts_ggml": "fused MoE over GGML-block experts (the same grouped GEMMs, weights dequantized in "
                           "registers: q4_0, q8_0, q2_K ... q6_K)"}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_moe.kernels", OPS)
