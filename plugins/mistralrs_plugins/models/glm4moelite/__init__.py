"""GLM-4.7-Flash (Glm4MoeLiteForCausalLM: DeepSeek-V3's multi-head latent attention and routing,
dense/sparse layers from ``mlp_layer_types``). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="glm4moelite",
        builder="mistralrs_plugins.models.glm4moelite.model:Glm4MoeLiteForCausalLM",
        hf_architectures=("Glm4MoeLiteForCausalLM",),
        model_types=("glm4_moe_lite",),
        description="GLM-4.7-Flash (MLA with a compressed latent KV cache, noaux_tc sigmoid routing)",
    ))
