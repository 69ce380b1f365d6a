"""The Qwen3 causal LM (HF Qwen3ForCausalLM layout): per-head RMSNorm on q and k before
rotary (``self_attn.q_norm`` / ``k_norm``), ``head_dim`` from config (default 128, as
Qwen3Config), ``attention_bias`` on all four projections, Qwen-style sliding windows."""

from __future__ import annotations

from mistralrs.nn.decoder import CausalLM, DecoderSettings


class Qwen3ForCausalLM(CausalLM):
    arch_name = "qwen3"

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        if config.get("head_dim") is None:
            config = {**config, "head_dim": 128}  # Qwen3Config's default
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, sliding_policy="qwen", qk_norm="head", mlp_bias=False,
        )
