"""The paged attention backend in torch: decode steps attend for the whole batch at once over
gathered KV blocks (one SDPA call per layer), prefill chunks per sequence. Any device torch
runs on; preferred over the reference backend."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import AttentionBackendSpec


@hookimpl
def register_attention_backends(register):
    register(AttentionBackendSpec(
        name="paged",
        backend="mistralrs_plugins.attention.paged.backend:PagedBackend",
        priority=10,
        paged=True,
        description="paged KV cache, batched decode (torch; CPU and GPU)",
    ))
