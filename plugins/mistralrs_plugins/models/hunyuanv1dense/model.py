"""HunYuan dense (HF HunYuanDenseV1ForCausalLM) on the shared decoder::

    model.layers.N.self_attn.{q,k,v,o}_proj (+ bias when attention_bias)
    model.layers.N.self_attn.{query,key}_layernorm     per-head RMSNorm, applied AFTER the rotary
    model.layers.N.mlp.{gate,up,down}_proj

Otherwise Llama. The two HunYuan details: q and k are normed per head after the rotary
(``qk_norm="head_post_rope"``; the checkpoint's ``query_layernorm`` / ``key_layernorm`` are our
``q_norm`` / ``k_norm``), and the rope a checkpoint labels ``dynamic`` with an ``alpha`` is
NTK-alpha (a fixed base ``theta * alpha ** (d / (d - 2))``; `mistralrs.nn.rotary`).
"""

from __future__ import annotations

from mistralrs.nn.decoder import CausalLM, DecoderSettings, cfg_get

# the checkpoint's QK-norm names -> the shared Attention's
QK_NORM_NAMES = (
    (r"\.self_attn\.query_layernorm\.", ".self_attn.q_norm."),
    (r"\.self_attn\.key_layernorm\.", ".self_attn.k_norm."),
)


def hunyuan_settings(config: dict, arch: str) -> DecoderSettings:
    """Llama's settings with QK-norm after the rotary and HunYuan's defaults (eps 1e-5)."""
    return DecoderSettings.from_hf(config, arch=arch, qk_norm="head_post_rope", mlp_bias=False,
                                   norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-5, arch=arch)))


class HunYuanDenseV1ForCausalLM(CausalLM):
    arch_name = "hunyuanv1dense"
    checkpoint_name_map = QK_NORM_NAMES

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return hunyuan_settings(config, cls.arch_name)
