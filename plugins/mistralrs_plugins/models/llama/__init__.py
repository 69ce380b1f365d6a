"""Llama (1/2/3.x and the many checkpoints that share its layout). Registration only: the torch
model lives in `.model` and is imported when a model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="llama",
        builder="mistralrs_plugins.models.llama.model:LlamaForCausalLM",
        hf_architectures=("LlamaForCausalLM",),
        model_types=("llama",),
        gguf_architectures=("llama",),
        gguf_converter="mistralrs_plugins.models.llama.gguf:convert",
        description="Llama 1/2/3.x (GQA, llama3/linear/dynamic/yarn rope scaling, optional biases, tied embeddings)",
    ))
