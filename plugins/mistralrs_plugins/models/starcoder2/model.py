"""The StarCoder2 causal LM (HF Starcoder2ForCausalLM layout).

Pre-norm blocks with LayerNorm (weight + bias, ``norm_epsilon``) and a plain two-layer MLP::

    model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
    mlp.{c_fc,c_proj}}  model.norm  [lm_head]

config keys: the common decoder keys, ``norm_epsilon`` (1e-5), ``use_bias`` (true: biases on
q/k/v/o and c_fc/c_proj), ``hidden_act`` (gelu_pytorch_tanh), ``sliding_window`` (every layer
when set), ``num_key_value_heads`` (2), ``tie_word_embeddings`` (true).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.mlp import MLP
from mistralrs.nn.norm import LayerNorm


class Starcoder2DecoderLayer(DecoderLayer):
    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        self.input_layernorm = LayerNorm(s.hidden_size, s.norm_eps)
        self.post_attention_layernorm = LayerNorm(s.hidden_size, s.norm_eps)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        return MLP(s.hidden_size, s.intermediate_size, s.hidden_act, bias=s.mlp_bias, names=("c_fc", "c_proj"))


class Starcoder2ForCausalLM(CausalLM):
    arch_name = "starcoder2"
    layer_cls = Starcoder2DecoderLayer

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.model.norm = LayerNorm(self.s.hidden_size, self.s.norm_eps)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        arch = cls.arch_name
        if config.get("num_key_value_heads") is None:
            config = {**config, "num_key_value_heads": 2}  # Starcoder2Config's default
        use_bias = bool(cfg_get(config, "use_bias", True, arch=arch))
        return DecoderSettings.from_hf(
            config, arch=arch, sliding_policy="all", tie_default=True,
            norm_eps=float(cfg_get(config, "norm_epsilon", 1e-5, arch=arch)),
            hidden_act=str(cfg_get(config, "hidden_act", "gelu_pytorch_tanh", arch=arch)),
            qkv_bias=use_bias, o_bias=use_bias, mlp_bias=use_bias,
        )
