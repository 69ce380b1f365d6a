"""The reference attention backend: torch scaled_dot_product_attention, one sequence at a
time, over a slot-indexed KV cache. Simple and exact; what faster backends are tested against."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import AttentionBackendSpec


@hookimpl
def register_attention_backends(register):
    register(AttentionBackendSpec(
        name="sdpa",
        backend="mistralrs_plugins.attention.sdpa.backend:SdpaBackend",
        priority=0,
        paged=False,
        description="reference torch SDPA, per sequence (any device, any dtype)",
    ))
