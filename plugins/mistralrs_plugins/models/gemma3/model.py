"""The Gemma 3 text causal LM (HF Gemma3ForCausalLM layout, model_type ``gemma3_text``).

Gemma 2's block (``(1 + w)`` RMSNorms, sqrt(hidden)-scaled embeddings, GeGLU, sandwich norms,
``query_pre_attn_scalar ** -0.5`` attention scale, tied head by default) with:

* QK-norm: a per-head ``(1 + w)`` RMSNorm on q and k (``self_attn.q_norm`` / ``k_norm``),
  before rotary;
* the layer pattern: ``layer_types`` ("sliding_attention" / "full_attention"); when absent,
  every ``sliding_window_pattern``-th layer (default 6: layers 5, 11, ...) is global and the
  others slide over ``sliding_window`` (default 4096; null disables it);
* two rotary embeddings: global layers use ``rope_parameters["full_attention"]``, sliding
  layers ``rope_parameters["sliding_attention"]``. Older configs give the global
  ``rope_theta`` (default 1e6), the local ``rope_local_base_freq`` (default 1e4) and a
  ``rope_scaling`` that applies to the global layers only; transformers' conversion is
  reproduced exactly (a flat, un-nested ``rope_parameters`` is ignored, as there);
* an optional final-logit softcap ``final_logit_softcapping`` (default null: off);
* ``attn_logit_softcapping`` is accepted and ignored: transformers' Gemma3Attention stores it
  but never passes it to the attention function (Gemma 3's released configs set it to null),
  so applying it would diverge from the reference.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import (
    DEFAULT_IGNORED_KEYS,
    CausalLM,
    DecoderModel,
    DecoderSettings,
    _ctx_device,
    _ctx_registry,
)
from mistralrs.nn.embedding import Embedding
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import RMSNorm
from mistralrs_plugins.models.gemma.model import GEMMA_DEFAULT_HEAD_DIM, check_causal, gemma_common
from mistralrs_plugins.models.gemma2.model import Gemma2DecoderLayer

SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)

_DEFAULTS = {  # Gemma3TextConfig defaults for the keys whose absence is not "off"
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
}
_DEFAULT_SLIDING_WINDOW_PATTERN = 6
_DEFAULT_GLOBAL_THETA = 1_000_000.0
_DEFAULT_LOCAL_THETA = 10_000.0


def _key(config: dict, key: str) -> Any:
    """config[key] when present (an explicit null stays None), else Gemma3TextConfig's default."""
    return config[key] if key in config else _DEFAULTS[key]


def gemma3_layer_types(config: dict, num_layers: int) -> list[str]:
    """``layer_types``, or Gemma3TextConfig's rule from ``sliding_window_pattern``: layer i is
    global when (i + 1) % pattern == 0."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        pattern = config.get("sliding_window_pattern")
        if pattern is None:
            pattern = _DEFAULT_SLIDING_WINDOW_PATTERN
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ModelLoadError(f"config.json: sliding_window_pattern must be a positive integer, got {pattern!r}")
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ModelLoadError(
            f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}; "
            "make them agree"
        )
    unknown = sorted({str(t) for t in layer_types} - set(LAYER_TYPES))
    if unknown:
        raise ModelLoadError(
            f"config.json: layer_types contains {', '.join(repr(t) for t in unknown)}; "
            f"gemma3_text layers are {SLIDING!r} or {FULL!r}"
        )
    return list(layer_types)


def gemma3_rope_parameters(config: dict) -> dict[str, dict]:
    """The per-layer-type rope parameters as Gemma3TextConfig.convert_rope_params_to_dict
    builds them: nested ``rope_parameters`` entries (missing ones default), the legacy
    ``rope_scaling`` merged into the global entry, the global theta from ``rope_theta``
    (default 1e6) and the local one from ``rope_local_base_freq`` (default 1e4) where the entry
    has none."""
    raw = config.get("rope_parameters")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ModelLoadError(f"config.json rope_parameters must be an object, got {type(raw).__name__}")
    nested = {t: copy.deepcopy(raw.get(t)) for t in LAYER_TYPES}
    for t in LAYER_TYPES:
        if nested[t] is None:
            nested[t] = {"rope_type": "default"}
        elif not isinstance(nested[t], dict):
            raise ModelLoadError(f"config.json rope_parameters.{t} must be an object, got {type(nested[t]).__name__}")
    scaling = config.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ModelLoadError(f"config.json rope_scaling must be an object, got {type(scaling).__name__}")
        nested[FULL].update(scaling)
    thetas = {FULL: (config.get("rope_theta"), _DEFAULT_GLOBAL_THETA),
              SLIDING: (config.get("rope_local_base_freq"), _DEFAULT_LOCAL_THETA)}
    for t, (theta, default) in thetas.items():
        if nested[t].get("rope_theta") is None:  # absent (or null: transformers would fail on it)
            nested[t]["rope_theta"] = default if theta is None else theta
    return nested


def _rope_config(config: dict) -> dict:
    """`config` with the per-layer-type rope parameters in the nested transformers-5 form that
    `RotaryEmbedding.from_config(..., layer_type=...)` reads."""
    prf = config.get("partial_rotary_factor")
    if prf is not None and prf != 1 and prf != 1.0:
        raise ModelLoadError(
            f"config.json: partial_rotary_factor {prf!r} is not supported for gemma3_text "
            "(Gemma 3 rotates the whole head)"
        )
    return {**config, "rope_scaling": None, "rope_theta": None, "rope_parameters": gemma3_rope_parameters(config)}


def _optional_float(config: dict, key: str) -> float | None:
    value = _key(config, key)
    return float(value) if value else None


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's sandwich block; the attention gets ``(1 + w)`` QK-norm from the settings."""


class Gemma3TextModel(DecoderModel):
    """HF's ``model``: embed_tokens, layers, norm, and two rotary embeddings — ``rotary_emb``
    (global layers) and ``rotary_emb_local`` (sliding layers), each shared by its layers."""

    def __init__(self, config: dict, s: DecoderSettings, layer_types: list[str], ctx: Any = None) -> None:
        nn.Module.__init__(self)
        from mistralrs.nn.rotary import RotaryEmbedding

        device, registry = _ctx_device(ctx), _ctx_registry(ctx)
        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size, scale=s.embed_scale)
        rope_config = _rope_config(config)
        with torch.device("cpu"):  # frequencies are computed at construction, even in a meta build
            self.rotary_emb = RotaryEmbedding.from_config(rope_config, head_dim=s.head_dim, layer_type=FULL)
            self.rotary_emb_local = RotaryEmbedding.from_config(rope_config, head_dim=s.head_dim, layer_type=SLIDING)
        rotaries = {FULL: self.rotary_emb, SLIDING: self.rotary_emb_local}
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(s, i, rotaries[layer_types[i]], ctx) for i in range(s.num_layers)
        )
        self.norm = RMSNorm(s.hidden_size, s.norm_eps, add_unit_offset=True, device=device, registry=registry)


class Gemma3ForCausalLM(CausalLM):
    """config keys: Gemma's (``head_dim`` default 256, ``hidden_activation``,
    ``attention_bias``, ``tie_word_embeddings`` default true) plus ``query_pre_attn_scalar``,
    ``sliding_window``, ``layer_types`` / ``sliding_window_pattern``, ``rope_parameters``
    (nested per layer type) or ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``,
    ``final_logit_softcapping`` (``attn_logit_softcapping`` is ignored, as in transformers)."""

    arch_name = "gemma3_text"
    layer_cls = Gemma3DecoderLayer
    # HF's per-layer-type rotary buffers (non-persistent today; skipped if a checkpoint has them)
    ignored_checkpoint_keys = DEFAULT_IGNORED_KEYS + (
        r"(^|\.)rotary_emb(_local)?\.\w*inv_freq$",
        r"(^|\.)rotary_emb(_local)?\.\w*attention_scaling$",
    )

    def __init__(self, config: dict, ctx: Any = None) -> None:
        nn.Module.__init__(self)  # CausalLM's layout, with Gemma 3's two rotary embeddings
        self.config = config
        self.s = self.settings(config)
        self.layer_types = gemma3_layer_types(config, self.s.num_layers)
        self.model = Gemma3TextModel(config, self.s, self.layer_types, ctx)
        if self.s.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(self.s.hidden_size, self.s.vocab_size, bias=False)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        check_causal(config, cls.arch_name)
        if config.get("head_dim") is None:
            config = {**config, "head_dim": GEMMA_DEFAULT_HEAD_DIM}
        layers = int(config.get("num_hidden_layers") or 0)
        scalar = _key(config, "query_pre_attn_scalar")
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise ModelLoadError(f"config.json: query_pre_attn_scalar must be a positive number, got {scalar!r}")
        window = _key(config, "sliding_window")
        windows: list[int | None] = []
        if layers > 0:
            windows = [int(window) if window and t == SLIDING else None for t in gemma3_layer_types(config, layers)]
            _rope_config(config)  # validate the rope parameters early, with a one-line error
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, tie_default=True,
            hidden_act=str(config.get("hidden_activation") or "gelu_pytorch_tanh"),
            attn_scale=float(scalar) ** -0.5,
            attn_softcap=None,  # attn_logit_softcapping: ignored, as in transformers (module docstring)
            final_softcap=_optional_float(config, "final_logit_softcapping"),
            sliding_windows=windows,
            qk_norm="head",
            **gemma_common(config),
        )
