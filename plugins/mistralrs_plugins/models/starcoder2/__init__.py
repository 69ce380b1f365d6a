"""StarCoder2 (HF Starcoder2ForCausalLM). Registration only: the torch model lives in
`.model` and is imported when a model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="starcoder2",
        builder="mistralrs_plugins.models.starcoder2.model:Starcoder2ForCausalLM",
        hf_architectures=("Starcoder2ForCausalLM",),
        model_types=("starcoder2",),
        gguf_architectures=("starcoder2",),
        gguf_converter="mistralrs_plugins.models.starcoder2.gguf:convert",
        description="StarCoder2 (LayerNorm with bias, GELU MLP c_fc/c_proj, biases, sliding window, "
                    "tied embeddings)",
    ))
