"""Triton decode attention over the paged KV cache for CUDA: ``paged_attention_decode``.

Registration only: no torch or triton import here (`kernels.triton_support` decides when the kernel
claims ``cuda``). The kernel is `kernels.paged_attention_decode`: split-K over the context (each split
an online softmax over its share of the keys, read in place through the block table), then one
reduction of the splits; grouped-query heads share their KV head's loads; sliding window and softcap.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs_plugins.kernels.triton_support import register_ops

OPS = {"paged_attention_decode": "paged decode attention (split-K, GQA, sliding window, softcap; K/V read in place)"}


@hookimpl
def register_kernels(register):
    register_ops(register, "mistralrs_plugins.kernels.triton_attention.kernels", OPS)
