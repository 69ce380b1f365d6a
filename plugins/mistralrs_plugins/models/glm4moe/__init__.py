"""GLM-4.5 / 4.6 / 4.7 (Glm4MoeForCausalLM: GQA with partial rotary and optional QK-norm, sigmoid
group-routed experts with a shared expert, dense first layers). Registration only: the torch
model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="glm4moe",
        builder="mistralrs_plugins.models.glm4moe.model:Glm4MoeForCausalLM",
        hf_architectures=("Glm4MoeForCausalLM",),
        model_types=("glm4_moe",),
        gguf_architectures=("glm4moe",),
        gguf_converter="mistralrs_plugins.models.glm4moe.gguf:convert",
        description="GLM-4.5/4.6/4.7 MoE (partial rotary, QK-norm, noaux_tc sigmoid routing, shared expert)",
    ))
