"""GGUF ``lfm2`` files (LFM2, LFM2.5) back into the HF checkpoint.

llama.cpp's ``LFM2Model`` converter writes ``attention.head_count_kv`` per layer (0 for a
short-conv layer: which layers attend), the conv kernel as ``shortconv.l_cache``, the
feed-forward width already adjusted (``block_auto_adjust_ff_dim`` applied: the config takes it
as given), the conv weight squeezed to [H, L] (back to [H, 1, L]) and the final norm
(``model.embedding_norm``) as ``token_embd_norm``. Q/K are not permuted (NeoX rope).
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import (
    STANDARD_BLOCK_NAMES,
    GgufConversion,
    Hparams,
    Transform,
    attending_layers,
    map_tensors,
    reshape_to,
    standard_config,
)

BLOCK_NAMES = {
    **STANDARD_BLOCK_NAMES,
    "attn_norm": "operator_norm",
    "ffn_norm": "ffn_norm",
    "attn_q_norm": "self_attn.q_layernorm",
    "attn_k_norm": "self_attn.k_layernorm",
    "attn_output": "self_attn.out_proj",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "shortconv.conv": "conv.conv",
    "shortconv.in_proj": "conv.in_proj",
    "shortconv.out_proj": "conv.out_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "token_embd_norm": "model.embedding_norm", "output": "lm_head"}


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture="Lfm2ForCausalLM", model_type="lfm2", hp=hp)
    layers = config["num_hidden_layers"]
    tied = config["tie_word_embeddings"]
    config.update({
        "layer_types": ["full_attention" if a else "conv" for a in attending_layers(hp, layers)],
        "conv_L_cache": int(hp.require("shortconv.l_cache")),
        "conv_bias": any(name.endswith(".shortconv.conv.bias") for name in gguf.tensors),
        "norm_eps": float(hp.require("attention.layer_norm_rms_epsilon")),
        "intermediate_size": int(hp.scalar("feed_forward_length")),
        "block_auto_adjust_ff_dim": False,
        "tie_embedding": tied,
    })
    config.pop("head_dim", None)

    def transforms(hf_name: str, info: Any) -> Transform | None:
        if hf_name.endswith(".conv.conv.weight"):
            channels, kernel = info.shape
            return reshape_to(channels, 1, kernel)
        return None

    # the shortconv tensors have a dotted key (blk.N.shortconv.conv.weight): mapped as blocks
    parts = map_tensors(gguf, block_names=BLOCK_NAMES, top_names=TOP_NAMES, transforms=transforms)
    return GgufConversion(config=config, parts=parts)
