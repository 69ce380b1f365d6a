"""The Gemma 2 causal LM (HF Gemma2ForCausalLM layout).

Everything of Gemma (``(1 + w)`` RMSNorm, sqrt(hidden)-scaled embeddings, GeGLU, tied head,
``head_dim`` from config) plus:

* sandwich norms: ``h = x + post_attention_layernorm(attn(input_layernorm(x)))``;
  ``out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``;
* attention scale ``query_pre_attn_scalar ** -0.5`` (default 256) instead of head_dim ** -0.5;
* attention-score softcapping ``attn_logit_softcapping`` (default 50) and final-logit
  softcapping ``final_logit_softcapping`` (default 30); an explicit null disables either;
* sliding-window attention (``sliding_window``, default 4096; null disables it) on the layers
  ``layer_types`` marks "sliding_attention" — when ``layer_types`` is absent, on the even
  layers 0, 2, 4, ... (Gemma2Config's rule);
* the activation is ``hidden_activation`` (default "gelu_pytorch_tanh").
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, _ctx_device, _ctx_registry
from mistralrs.nn.norm import RMSNorm
from mistralrs_plugins.models.gemma.model import GEMMA_DEFAULT_HEAD_DIM, check_causal, gemma_common

_DEFAULTS = {  # Gemma2Config defaults for the keys whose absence is not "off"
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
}


def _key(config: dict, key: str) -> Any:
    """config[key] when present (an explicit null stays None), else Gemma2Config's default."""
    return config[key] if key in config else _DEFAULTS[key]


def gemma2_sliding_windows(config: dict, num_layers: int) -> list[int | None]:
    window = _key(config, "sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ModelLoadError(
            f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}; "
            "make them agree"
        )
    return [int(window) if window and t == "sliding_attention" else None for t in layer_types]


def _optional_float(config: dict, key: str) -> float | None:
    value = _key(config, key)
    return float(value) if value else None


class Gemma2DecoderLayer(DecoderLayer):
    """Gemma 2's block: norms before and after both the attention and the MLP."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: Any, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        device, registry = _ctx_device(ctx), _ctx_registry(ctx)
        self.pre_feedforward_layernorm = RMSNorm(s.hidden_size, s.norm_eps, add_unit_offset=True,
                                                 device=device, registry=registry)
        self.post_feedforward_layernorm = RMSNorm(s.hidden_size, s.norm_eps, add_unit_offset=True,
                                                  device=device, registry=registry)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), batch)
        hidden = hidden + self.post_attention_layernorm(attn)
        ffn = self.ffn(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(ffn)


class Gemma2ForCausalLM(CausalLM):
    """config keys: Gemma's, plus ``query_pre_attn_scalar``, ``attn_logit_softcapping``,
    ``final_logit_softcapping``, ``sliding_window``, ``layer_types``, ``hidden_activation``."""

    arch_name = "gemma2"
    layer_cls = Gemma2DecoderLayer

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        check_causal(config, cls.arch_name)
        if config.get("head_dim") is None:
            config = {**config, "head_dim": GEMMA_DEFAULT_HEAD_DIM}
        layers = int(config.get("num_hidden_layers") or 0)
        scalar = _key(config, "query_pre_attn_scalar")
        if scalar is None or float(scalar) <= 0:
            raise ModelLoadError(f"config.json: query_pre_attn_scalar must be a positive number, got {scalar!r}")
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, tie_default=True,
            hidden_act=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
            attn_scale=float(scalar) ** -0.5,
            attn_softcap=_optional_float(config, "attn_logit_softcapping"),
            final_softcap=_optional_float(config, "final_logit_softcapping"),
            sliding_windows=gemma2_sliding_windows(config, layers) if layers > 0 else [],
            **gemma_common(config),
        )
