"""DeepSeek-V3 / R1 (multi-head latent attention with q LoRA, sigmoid-scored group top-k MoE with a
correction bias). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="deepseekv3",
        builder="mistralrs_plugins.models.deepseekv3.model:DeepseekV3ForCausalLM",
        hf_architectures=("DeepseekV3ForCausalLM",),
        model_types=("deepseek_v3",),
        description="DeepSeek-V3 / R1 (MLA with a compressed latent KV cache, noaux_tc sigmoid routing)",
    ))
