"""The Qwen2 causal LM (HF Qwen2ForCausalLM layout): q/k/v biases (no o bias), and a sliding
window on the layers that ``layer_types`` marks, or, in older configs, on layers
>= ``max_window_layers`` when ``use_sliding_window`` is true."""

from __future__ import annotations

from mistralrs.nn.decoder import CausalLM, DecoderSettings


class Qwen2ForCausalLM(CausalLM):
    arch_name = "qwen2"

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, sliding_policy="qwen",
            qkv_bias=True, o_bias=False, mlp_bias=False,
        )
