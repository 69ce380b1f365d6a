"""The Llama causal LM (HF LlamaForCausalLM layout)."""

from __future__ import annotations

from mistralrs.nn.decoder import CausalLM, DecoderSettings


class LlamaForCausalLM(CausalLM):
    """config keys: the common decoder keys plus ``attention_bias`` (q/k/v/o biases),
    ``mlp_bias``, ``head_dim``, ``tie_word_embeddings``, ``rope_scaling``/``rope_parameters``."""

    arch_name = "llama"

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return DecoderSettings.from_hf(config, arch=cls.arch_name)
