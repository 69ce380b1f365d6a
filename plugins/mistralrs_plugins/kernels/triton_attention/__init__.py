"""Triton attention over the paged KV cache for CUDA: ``paged_attention_decode``,
``paged_attention_prefill`` and the fp8 ``kv_cache_write``.

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernel
claims ``cuda``). The kernel is `kernels.paged_attention_decode`: split-K over the context (each split
an online softmax over its share of the keys, read in place through the block table), then one
reduction of the splits (sinks added there); grouped-query heads share their KV head's loads; sliding
window and softcap; fp8 E4M3 caches widened in registers.
`kernels.paged_attention_prefill`: flash-attention tiles of each sequence's new tokens over its cached
context and the chunk itself, read through the block table (causal, sliding window, softcap, sinks).
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {
    "paged_attention_decode": "paged decode attention (split-K, GQA, sliding window, softcap, sinks, fp8 caches; "
                              "K/V read in place)",
    "paged_attention_prefill": "paged prefill attention (flash tiles per sequence chunk over cached context, causal, "
                               "GQA, sliding window, softcap, sinks; K/V read in place)",
    "kv_cache_write": "fp8 E4M3 KV-cache write (the cast to fp8 fused with the scatter into the slots)",
}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_attention.kernels", OPS)
