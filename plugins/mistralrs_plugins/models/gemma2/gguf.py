"""GGUF ``gemma2`` files.

llama.cpp's converter (``Gemma2Model``) stores every RMSNorm weight as ``1 + w``, drops
``lm_head.weight`` (the graph reuses the token embeddings), names the sandwich norms
``post_attention_norm`` / ``ffn_norm`` / ``post_ffw_norm`` and writes the softcaps and the
window, but no layer pattern and no ``query_pre_attn_scalar``. The config here is what
llama.cpp's gemma2 graph runs: sliding window on the layers of ``attention.sliding_window_pattern``
(default: every other layer from layer 0, Gemma 2's own rule), the attention scale
head_dim ** -0.5 (hidden / heads ** -0.5 for the 46-layer 27B, as llama.cpp hard-codes), the
softcaps with llama.cpp's defaults (50, 30) where the file has none.
"""

from __future__ import annotations

from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard, sliding_window_layers
from mistralrs_plugins.models.gemma.gguf import gemma_head_dim, unit_offset_norms

SANDWICH_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def layer_types(sliding: list[bool]) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    layers = int(hp.require("block_count"))
    hidden, heads = int(hp.require("embedding_length")), int(hp.scalar("attention.head_count"))
    head_dim = gemma_head_dim(hp)
    sliding = sliding_window_layers(hp, layers, 2)
    base, swa_base = hp.get("rope.freq_base", 10000.0), hp.get("rope.freq_base_swa")
    if swa_base is not None and float(swa_base) != float(base) and any(sliding):
        raise ModelLoadError(
            f"{hp.where}: a separate sliding-window rope base ({swa_base} vs {base}) is not part of a gemma2 model; "
            "load the file as the architecture it was made for"
        )
    return convert_standard(
        gguf, hf_architecture="Gemma2ForCausalLM", model_type="gemma2", block_names=SANDWICH_NAMES,
        extra_config={
            "head_dim": head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": hidden // heads if layers == 46 else head_dim,
            "attn_logit_softcapping": float(hp.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(hp.get("final_logit_softcapping", 30.0)),
            "sliding_window": int(hp.get("attention.sliding_window") or 4096),
            "layer_types": layer_types(sliding),
        },
        transforms=unit_offset_norms,
    )
