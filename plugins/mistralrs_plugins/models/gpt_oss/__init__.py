"""GPT-OSS (attention sinks, alternating sliding/full layers, clamped-SwiGLU MoE; MXFP4 experts
through the `mxfp4_checkpoint` format). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="gpt_oss",
        builder="mistralrs_plugins.models.gpt_oss.model:GptOssForCausalLM",
        hf_architectures=("GptOssForCausalLM",),
        model_types=("gpt_oss",),
        gguf_architectures=("gpt-oss",),
        gguf_converter="mistralrs_plugins.models.gpt_oss.gguf:convert",
        description="GPT-OSS (attention sinks, sliding/full layers, biased clamped-SwiGLU experts)",
    ))
