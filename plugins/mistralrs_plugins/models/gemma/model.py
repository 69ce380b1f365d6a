"""The Gemma causal LM (HF GemmaForCausalLM layout).

Llama's layout with Gemma's numerics: RMSNorm multiplies by ``(1 + w)`` (computed in float32,
cast once), the embedding output is scaled by ``sqrt(hidden_size)`` rounded to the activation
dtype first (so 55.4256 becomes 55.5 in bf16, as in HF), the MLP is GeGLU with the tanh
approximation, ``head_dim`` comes from config (GemmaConfig's default 256, not hidden / heads)
and the LM head is tied to the embedding unless ``tie_word_embeddings`` is false.
"""

from __future__ import annotations

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderSettings

GEMMA_DEFAULT_HEAD_DIM = 256  # GemmaConfig / Gemma2Config default


def gemma_activation(config: dict) -> str:
    """GemmaConfig's activation: ``hidden_act`` (default "gelu_pytorch_tanh"); the legacy value
    "gelu" of the official releases means the tanh approximation, which transformers
    substitutes. A config with only ``hidden_activation`` (the Gemma 2 key) uses that."""
    act = config.get("hidden_act") or config.get("hidden_activation") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else str(act)


def check_causal(config: dict, arch: str) -> None:
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(
            f"config.json: use_bidirectional_attention is true; {arch} is implemented as a causal LM only "
            "(set it to false or remove the key)"
        )


def gemma_common(config: dict) -> dict:
    """The DecoderSettings overrides every Gemma generation shares."""
    hidden = int(config.get("hidden_size") or 0)
    return dict(
        norm_unit_offset=True,
        embed_scale=float(hidden) ** 0.5,
        mlp_bias=False,  # Gemma's MLP projections have no bias
    )


class GemmaForCausalLM(CausalLM):
    """config keys: the common decoder keys, ``head_dim`` (default 256), ``hidden_act``,
    ``attention_bias`` (q/k/v/o biases), ``tie_word_embeddings`` (default true),
    ``rope_parameters`` / ``rope_theta`` / ``rope_scaling``."""

    arch_name = "gemma"

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        check_causal(config, cls.arch_name)
        if config.get("head_dim") is None:
            config = {**config, "head_dim": GEMMA_DEFAULT_HEAD_DIM}
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, tie_default=True, hidden_act=gemma_activation(config),
            **gemma_common(config),
        )
