"""GGUF ``phi3`` files (Phi-3, Phi-3.5-mini, Phi-4, Phi-4-mini).

llama.cpp's converter (``Phi3MiniModel``) keeps HF Phi-3's fused projections, renamed:
``qkv_proj`` -> ``attn_qkv`` and ``gate_up_proj`` -> ``ffn_up`` (2 * intermediate rows), which
map straight back (the model keeps them fused). Longrope becomes two tensors,
``rope_factors_long`` / ``rope_factors_short``, plus ``rope.scaling.original_context_length``
and ``rope.scaling.attn_factor``; the partial rotary is ``rope.dimension_count``. The sliding
window is written, but llama.cpp's phi3 graph ignores it ("Phi SWA is currently disabled"), so
the config has none.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import (
    CONSUMED_TENSORS,
    STANDARD_BLOCK_NAMES,
    GgufConversion,
    Hparams,
    map_tensors,
    partial_rotary_factor,
    standard_config,
)

PHI3_BLOCK_NAMES = {**STANDARD_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def _factors(gguf: Any, name: str) -> list[float]:
    return gguf.tensor(name).float().reshape(-1).tolist()


def apply_longrope(gguf: Any, hp: Hparams, config: dict) -> None:
    """Longrope as the converter wrote it (``rope_factors_long`` / ``rope_factors_short`` tensors,
    ``rope.scaling.original_context_length``, ``rope.scaling.attn_factor``) back into config.json's
    ``rope_scaling`` (Phi-3 and Phi-3.5-MoE)."""
    orig = hp.get("rope.scaling.original_context_length")
    if orig:
        config["original_max_position_embeddings"] = int(orig)
    if all(name in gguf.tensors for name in ROPE_FACTOR_TENSORS):
        rope: dict[str, Any] = {
            "rope_type": "longrope",
            "rope_theta": config["rope_theta"],
            "long_factor": _factors(gguf, "rope_factors_long.weight"),
            "short_factor": _factors(gguf, "rope_factors_short.weight"),
        }
        if orig:
            rope["original_max_position_embeddings"] = int(orig)
        attn_factor = hp.get("rope.scaling.attn_factor")
        if attn_factor is not None:
            rope["attention_factor"] = float(attn_factor)
        config["rope_scaling"] = rope


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture="Phi3ForCausalLM", model_type="phi3", hp=hp)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    config["head_dim"] = head_dim
    prf = partial_rotary_factor(hp, head_dim)
    if prf is not None:
        config["partial_rotary_factor"] = prf
    config["sliding_window"] = None  # llama.cpp's phi3 runs without it
    apply_longrope(gguf, hp, config)
    parts = map_tensors(gguf, block_names=PHI3_BLOCK_NAMES, skip=CONSUMED_TENSORS + ROPE_FACTOR_TENSORS)
    return GgufConversion(config=config, parts=parts)
