"""The Mixtral causal LM (HF MixtralForCausalLM layout): Mistral attention (no biases, the
config's ``sliding_window`` on every layer when set; MixtralConfig's default is none) and a
top-k sparse mixture of experts in place of the MLP::

    model.layers.N.block_sparse_moe.gate                      router, [num_local_experts, H]
    model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}      gate / up / down of expert E

Routing: softmax over the router logits in float32, top ``num_experts_per_tok``, renormalised
to sum to one; the expert outputs are scaled in float32 (as transformers).

Checkpoint layouts: the per-expert names above (Hub checkpoints, and what transformers 5
``save_pretrained`` writes by default), and transformers 5's in-memory layout (what
``save_pretrained(save_original_format=False)`` writes): ``mlp.gate.weight``,
``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``mlp.experts.down_proj [E, H, I]``, split into the per-expert linears while loading
(`split_checkpoint_tensor`), so quantizers see ordinary `Linear` experts either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get, sliding_windows_for
from mistralrs.nn.moe import MIXTRAL_EXPERT_NAMES, SparseMoE

_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_fused_experts(
    name: str, shape: tuple[int, ...], expert_names: Sequence[str]
) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """transformers 5's fused expert tensors -> per-expert linear weights.

    ``<prefix>.experts.gate_up_proj [E, 2I, H]`` -> ``<prefix>.experts.e.<gate>.weight`` (rows
    ``:I``) and ``<up>.weight`` (rows ``I:``); ``<prefix>.experts.down_proj [E, H, I]`` ->
    ``<prefix>.experts.e.<down>.weight``. `expert_names` = (gate, up, down). None for any
    other name (the loader then reports the tensor as unexpected)."""
    m = _FUSED_EXPERTS.match(name)
    if m is None or len(shape) != 3:
        return None
    prefix, num_experts = m["prefix"], int(shape[0])
    gate, up, down = expert_names
    if m["kind"] == "down_proj":
        return [(f"{prefix}.{e}.{down}.weight", lambda t, e=e: t[e]) for e in range(num_experts)]
    if shape[1] % 2:
        raise ModelLoadError(
            f"checkpoint tensor {name!r} has shape {list(shape)}; a fused gate_up_proj needs an even "
            "second dimension (gate rows, then up rows)"
        )
    half = int(shape[1]) // 2
    parts: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
    for e in range(num_experts):
        parts.append((f"{prefix}.{e}.{gate}.weight", lambda t, e=e: t[e, :half]))
        parts.append((f"{prefix}.{e}.{up}.weight", lambda t, e=e: t[e, half:]))
    return parts


def moe_sizes(config: dict, *, arch: str, experts_keys: tuple[str, ...], default_experts: int,
              default_top_k: int) -> tuple[int, int]:
    """(number of experts, experts per token) from config.json, validated."""
    num_experts = int(cfg_get(config, experts_keys, default_experts, arch=arch))
    top_k = int(cfg_get(config, "num_experts_per_tok", default_top_k, arch=arch))
    if num_experts > 0 and not 0 < top_k <= num_experts:
        raise ModelLoadError(
            f"config.json: num_experts_per_tok ({top_k}) must be in [1, {' / '.join(experts_keys)} = {num_experts}] "
            f"for {arch}"
        )
    return num_experts, top_k


class MixtralDecoderLayer(DecoderLayer):
    mlp_name = "block_sparse_moe"

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        num_experts, top_k = moe_sizes(s.config, arch=s.arch, experts_keys=("num_local_experts", "num_experts"),
                                       default_experts=8, default_top_k=2)
        if num_experts <= 0:
            raise ModelLoadError(f"config.json: num_local_experts must be positive for {s.arch}, got {num_experts}")
        return SparseMoE(
            s.hidden_size, s.intermediate_size, num_experts, top_k, s.hidden_act,
            norm_topk_prob=True, expert_names=MIXTRAL_EXPERT_NAMES, routing_weights_in_model_dtype=False,
        )


class MixtralForCausalLM(CausalLM):
    arch_name = "mixtral"
    layer_cls = MixtralDecoderLayer
    # transformers 5's in-memory (save_original_format=False) name of the MoE block
    checkpoint_name_map = ((r"(\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe."),)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        layers = int(config.get("num_hidden_layers") or 0)
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, qkv_bias=False, o_bias=False, mlp_bias=False,
            norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-5)),  # MixtralConfig's default
            sliding_windows=sliding_windows_for(config, layers, policy="all"),
        )

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, MIXTRAL_EXPERT_NAMES)
