"""The SmolLM3 causal LM (HF SmolLM3ForCausalLM layout): Llama's layout (tied embeddings by
default, rope theta default 2e6) with NoPE layers — rotary is skipped on the layers whose
``no_rope_layers`` entry is 0. When ``no_rope_layers`` is absent every
``no_rope_layer_interval``-th layer (default 4: layers 3, 7, 11, ...) is NoPE.

Sliding windows: ``sliding_window`` on the layers ``layer_types`` marks "sliding_attention";
when ``layer_types`` is absent, on the NoPE layers if ``use_sliding_window`` is true and
``sliding_window`` is set (SmolLM3Config's rule). As in transformers' eager/SDPA path, the
explicit ``layer_types`` decide the masks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings


def rope_layers(config: dict, num_layers: int) -> list[bool]:
    """Per layer: does it apply rotary?"""
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = int(config.get("no_rope_layer_interval") or 4)
        if interval <= 0:
            raise ModelLoadError(f"config.json: no_rope_layer_interval must be positive, got {interval}")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) < num_layers:
        raise ModelLoadError(
            f"config.json: no_rope_layers has {len(flags)} entries but num_hidden_layers is {num_layers}; "
            "it needs one entry (1 = RoPE, 0 = NoPE) per layer"
        )
    return [bool(f) for f in flags[:num_layers]]


def smollm3_sliding_windows(config: dict, num_layers: int) -> list[int | None]:
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is None:
        use_rope = rope_layers(config, num_layers)
        on = bool(config.get("use_sliding_window", False)) and window is not None
        layer_types = ["sliding_attention" if on and not use_rope[i] else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ModelLoadError(
            f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}; "
            "make them agree"
        )
    return [int(window) if window and t == "sliding_attention" else None for t in layer_types]


class SmolLM3DecoderLayer(DecoderLayer):
    """Llama's block; NoPE layers get no rotary."""

    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        if not rope_layers(s.config, s.num_layers)[layer_idx]:
            rotary = None
        return super().build_attention(s, layer_idx, rotary, ctx)


class SmolLM3ForCausalLM(CausalLM):
    """config keys: the common decoder keys plus ``no_rope_layers`` / ``no_rope_layer_interval``,
    ``use_sliding_window``, ``sliding_window``, ``layer_types``, ``attention_bias``, ``mlp_bias``,
    ``tie_word_embeddings`` (default true)."""

    arch_name = "smollm3"
    layer_cls = SmolLM3DecoderLayer

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        layers = int(config.get("num_hidden_layers") or 0)
        extra: dict[str, Any] = {}
        if layers > 0:
            rope_layers(config, layers)  # validate early, with a one-line error
            extra["sliding_windows"] = smollm3_sliding_windows(config, layers)
        return DecoderSettings.from_hf(config, arch=cls.arch_name, tie_default=True, **extra)
