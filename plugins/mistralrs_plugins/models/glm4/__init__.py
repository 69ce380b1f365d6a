"""GLM-4 (GLM-4-0414 and the checkpoints sharing Glm4ForCausalLM). Registration only: the
torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="glm4",
        builder="mistralrs_plugins.models.glm4.model:Glm4ForCausalLM",
        hf_architectures=("Glm4ForCausalLM",),
        model_types=("glm4",),
        gguf_architectures=("glm4",),
        gguf_converter="mistralrs_plugins.models.glm4.gguf:convert",
        description="GLM-4 (sandwich norms, fused gate_up MLP, partial pairwise rotary, q/k/v biases)",
    ))
