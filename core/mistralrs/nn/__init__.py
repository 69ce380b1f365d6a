"""Model building blocks (torch modules): norms, linear layers, rotary embeddings, ...

Names are exported lazily, so ``import mistralrs.nn.rotary`` does not drag in the rest.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY: dict[str, str] = {
    "Linear": "linear",
    "LinearMethodBase": "linear",
    "UnquantizedLinearMethod": "linear",
    "RMSNorm": "norm",
    "LayerNorm": "norm",
    "get_activation": "activation",
    "GatedMLP": "mlp",
    "MLP": "mlp",
    "SparseMoE": "moe",
    "route_topk": "moe",
    "Embedding": "embedding",
    "compute_logits": "embedding",
    "Attention": "attention",
    "RotaryEmbedding": "rotary",
    "DecoderSettings": "decoder",
    "DecoderLayer": "decoder",
    "DecoderModel": "decoder",
    "CausalLM": "decoder",
    "cfg_get": "decoder",
    "sliding_windows_for": "decoder",
    "lookup_kernel": "kernels",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mistralrs.nn' has no attribute {name!r}")
    return getattr(import_module(f"mistralrs.nn.{module}"), name)


__all__ = sorted(_LAZY)
