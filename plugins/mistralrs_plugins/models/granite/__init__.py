"""IBM Granite (3.x dense). Registration only: the torch model lives in `.model` and is
imported when a model is built."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="granite",
        builder="mistralrs_plugins.models.granite.model:GraniteForCausalLM",
        hf_architectures=("GraniteForCausalLM",),
        model_types=("granite",),
        gguf_architectures=("granite",),
        gguf_converter="mistralrs_plugins.models.granite.gguf:convert",
        description="Granite (Llama layout with embedding / attention / residual multipliers and "
                    "logits scaling)",
    ))
