"""LFM2 / LFM2.5 (Lfm2ForCausalLM: gated short-convolution layers with a recurrent conv state
beside GQA attention layers). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="lfm2",
        builder="mistralrs_plugins.models.lfm2.model:Lfm2ForCausalLM",
        hf_architectures=("Lfm2ForCausalLM",),
        model_types=("lfm2",),
        gguf_architectures=("lfm2",),
        gguf_converter="mistralrs_plugins.models.lfm2.gguf:convert",
        description="LFM2 (gated short-conv layers on the recurrent-state cache + QK-norm GQA attention)",
    ))
