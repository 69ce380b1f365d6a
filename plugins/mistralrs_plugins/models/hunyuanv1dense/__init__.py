"""HunYuan dense (HunYuanDenseV1ForCausalLM: Llama with QK-norm after the rotary and the
NTK-alpha rope). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="hunyuanv1dense",
        builder="mistralrs_plugins.models.hunyuanv1dense.model:HunYuanDenseV1ForCausalLM",
        hf_architectures=("HunYuanDenseV1ForCausalLM",),
        model_types=("hunyuan_v1_dense",),
        description="HunYuan dense (QK-norm after the rotary, NTK-alpha rope)",
    ))
