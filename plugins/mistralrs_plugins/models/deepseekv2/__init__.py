"""DeepSeek-V2 / V2-Lite (multi-head latent attention, shared + routed experts). Registration only:
the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="deepseekv2",
        builder="mistralrs_plugins.models.deepseekv2.model:DeepseekV2ForCausalLM",
        hf_architectures=("DeepseekV2ForCausalLM",),
        model_types=("deepseek_v2",),
        # llama.cpp's deepseek2 holds V2 and V3 alike; the converter tells them apart
        gguf_architectures=("deepseek2",),
        gguf_converter="mistralrs_plugins.models.deepseekv2.gguf:convert",
        description="DeepSeek-V2 (MLA with a compressed latent KV cache, group-limited MoE with shared experts)",
    ))
