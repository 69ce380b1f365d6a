"""GGUF ``gemma3`` files (the text model).

llama.cpp's converter (``Gemma3Model``) stores every RMSNorm weight, QK-norms included, as
``1 + w``; it writes the global rope base (``rope.freq_base``, with the global layers' linear
scaling) and the local one (``rope.freq_base_swa``), the window (when the checkpoint has a
sliding pattern at all) and the final softcap, but no layer pattern and no
``query_pre_attn_scalar``. The config here is what llama.cpp's gemma3 graph runs: sliding window
on the layers of ``attention.sliding_window_pattern`` (default: 5 of every 6, Gemma 3's own
rule), none at all without ``attention.sliding_window``; local layers on the local base without
scaling; the attention scale head_dim ** -0.5 (hidden / heads ** -0.5 for the 62-layer 27B, as
llama.cpp hard-codes); no attention softcap.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard, sliding_window_layers
from mistralrs_plugins.models.gemma.gguf import gemma_head_dim, unit_offset_norms
from mistralrs_plugins.models.gemma2.gguf import SANDWICH_NAMES, layer_types


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    layers = int(hp.require("block_count"))
    hidden, heads = int(hp.require("embedding_length")), int(hp.scalar("attention.head_count"))
    head_dim = gemma_head_dim(hp)
    window = hp.get("attention.sliding_window")
    sliding = sliding_window_layers(hp, layers, 6) if window else [False] * layers
    softcap = hp.get("final_logit_softcapping")
    return convert_standard(
        gguf, hf_architecture="Gemma3ForCausalLM", model_type="gemma3_text", block_names=SANDWICH_NAMES,
        extra_config={
            "head_dim": head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
            "final_logit_softcapping": float(softcap) if softcap else None,
            "attn_logit_softcapping": None,
            "sliding_window": int(window) if window else None,
            "layer_types": layer_types(sliding),
            # llama.cpp's default local base when the file has none
            "rope_local_base_freq": float(hp.get("rope.freq_base_swa", 10000.0)),
        },
        transforms=unit_offset_norms,
    )
