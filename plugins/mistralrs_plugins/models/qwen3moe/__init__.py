"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, ...). Registration only: the torch model lives
in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="qwen3moe",
        builder="mistralrs_plugins.models.qwen3moe.model:Qwen3MoeForCausalLM",
        hf_architectures=("Qwen3MoeForCausalLM",),
        model_types=("qwen3_moe",),
        gguf_architectures=("qwen3moe",),
        gguf_converter="mistralrs_plugins.models.qwen3moe.gguf:convert",
        description="Qwen3 sparse MoE (per-head QK RMSNorm, top-k experts, optional dense layers)",
    ))
