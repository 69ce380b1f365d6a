"""Registers the torch reference implementation of every named op (`mistralrs.nn.torch_ops`).
Always registered; other kernel plugins are tested against these and win by priority where
they can run."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import KernelSpec

OPS = ("rms_norm", "fused_add_rms_norm", "rotary", "silu_and_mul", "gelu_and_mul", "linear_bf16", "paged_attention_decode",
       "paged_attention_prefill", "moe_experts", "kv_cache_write")
DEVICES = ("cpu", "cuda", "mps")


@hookimpl
def register_kernels(register):
    for op in OPS:
        register(KernelSpec(
            name="torch",
            op=op,
            impl=f"mistralrs.nn.torch_ops:{op}",
            devices=DEVICES,
            priority=0,
            reference=True,
            description=f"torch reference {op}",
        ))
