"""The Mistral causal LM (HF MistralForCausalLM layout): Llama without biases, with the
config's ``sliding_window`` on every layer (HF's default 4096 when the key is absent)."""

from __future__ import annotations

from mistralrs.nn.decoder import CausalLM, DecoderSettings, sliding_windows_for


class MistralForCausalLM(CausalLM):
    arch_name = "mistral"

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        if "sliding_window" not in config:
            config = {**config, "sliding_window": 4096}  # MistralConfig's default
        layers = int(config.get("num_hidden_layers") or 0)
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, qkv_bias=False, o_bias=False, mlp_bias=False,
            sliding_windows=sliding_windows_for(config, layers, policy="all"),
        )
