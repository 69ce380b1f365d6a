"""HunYuan MoE (HunYuanMoEV1ForCausalLM: HunYuan dense's attention, a float32 softmax top-k
router and a shared MLP beside the routed experts). Registration only: the model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="hunyuanv1moe",
        builder="mistralrs_plugins.models.hunyuanv1moe.model:HunYuanMoEV1ForCausalLM",
        hf_architectures=("HunYuanMoEV1ForCausalLM",),
        model_types=("hunyuan_v1_moe",),
        description="HunYuan MoE (float32 top-k router, shared MLP, QK-norm after the rotary, NTK-alpha rope)",
    ))
