"""LFM2 MoE (Lfm2MoeForCausalLM, e.g. LFM2-8B-A1B: LFM2's short-conv and attention layers, dense
first layers, then sigmoid-routed experts). Registration only: the torch model lives in `.model`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="lfm2_moe",
        builder="mistralrs_plugins.models.lfm2_moe.model:Lfm2MoeForCausalLM",
        hf_architectures=("Lfm2MoeForCausalLM",),
        model_types=("lfm2_moe",),
        description="LFM2 MoE (short-conv layers on the recurrent-state cache, sigmoid top-k experts with a bias)",
    ))
