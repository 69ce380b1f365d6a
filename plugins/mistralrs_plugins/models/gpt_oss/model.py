"""GPT-OSS (gpt-oss-20b / 120b; HF GptOssForCausalLM): GQA attention with q/k/v/o biases and
per-head attention sinks (`attend(sinks=)`), ``layer_types`` alternating sliding-window and full
layers, yarn rope (NeoX halves), and a top-k mixture of experts with a biased router and
biased experts using a clamped SwiGLU::

    model.layers.N.self_attn.{q,k,v,o}_proj (+ bias), self_attn.sinks [heads]
    model.layers.N.mlp.router.{weight [E, H], bias [E]}
    model.layers.N.mlp.experts.gate_up_proj [E, H, 2I] (+ _bias [E, 2I]): columns interleaved gate, up, gate, ...
    model.layers.N.mlp.experts.down_proj [E, I, H] (+ _bias [E, H])

The stacked expert tensors (stored transposed, x @ W) are split while loading into per-expert
``experts.e.{gate_proj,up_proj,down_proj}`` linears (weights and biases), so ISQ, UQFF and the
MXFP4 checkpoint format (``*_blocks`` [E, out, in / 32, 16] and ``*_scales``: not transposed, the
same interleaved rows) see ordinary `Linear` experts.

Routing: logits = router(x) (with bias), top-k of the logits, softmax over those k values.
Expert: ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
``out = down((u + 1) * g * sigmoid(alpha * g))`` (``swiglu_alpha`` 1.702, ``swiglu_limit`` 7).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mistralrs.nn.attention import Attention
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get, sliding_windows_for
from mistralrs.nn.linear import Linear
from mistralrs.nn.moe import QWEN_EXPERT_NAMES, SparseMoE
from mistralrs_plugins.models.mixtral.model import moe_sizes

_STACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)(?P<bias>_bias)?$")


class ClampedSwiGLUExpert(nn.Module):
    """One GPT-OSS expert: biased gate/up/down linears and the clamped SwiGLU."""

    def __init__(self, hidden_size: int, intermediate_size: int, alpha: float, limit: float) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=True)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=True)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=True)
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class GptOssMoE(SparseMoE):
    """``gate`` (the checkpoint's ``router``: a biased linear) + ``experts`` (`ClampedSwiGLUExpert`);
    routing weights in the model dtype."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 alpha: float, limit: float) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, gate_bias=True,
                         expert_names=QWEN_EXPERT_NAMES, routing_weights_in_model_dtype=True)
        self.experts = nn.ModuleList(ClampedSwiGLUExpert(hidden_size, intermediate_size, alpha, limit)
                                     for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, ids = self.router(x).topk(self.top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids


class GptOssDecoderLayer(DecoderLayer):
    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        return Attention(
            s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, layer_idx=layer_idx, rotary=rotary,
            qkv_bias=s.qkv_bias, o_bias=s.o_bias, sliding_window=s.sliding_windows[layer_idx], sinks=True,
        )

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        cfg = s.config
        num_experts, top_k = moe_sizes(cfg, arch=s.arch, experts_keys=("num_local_experts", "num_experts"),
                                       default_experts=32, default_top_k=4)
        return GptOssMoE(s.hidden_size, s.intermediate_size, num_experts, top_k,
                         alpha=float(cfg_get(cfg, "swiglu_alpha", 1.702)), limit=float(cfg_get(cfg, "swiglu_limit", 7.0)))


class GptOssForCausalLM(CausalLM):
    arch_name = "gpt_oss"
    layer_cls = GptOssDecoderLayer
    # SparseMoE's `router` is a property naming its linear: the checkpoint's router is our gate
    checkpoint_name_map = ((r"(\.layers\.\d+\.mlp)\.router\.", r"\1.gate."),)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        layers = int(config.get("num_hidden_layers") or 0)
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, qkv_bias=bool(config.get("attention_bias", True)),
            o_bias=bool(config.get("attention_bias", True)), norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-5)),
            sliding_windows=sliding_windows_for(config, layers, policy="layer_types"),
        )

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_gpt_oss_experts(name, shape, self.s.hidden_size, self.s.intermediate_size)


def split_gpt_oss_experts(name: str, shape: tuple[int, ...], hidden: int, intermediate: int
                          ) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """GPT-OSS's stacked experts -> per-expert parameters. Float weights are stored transposed
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``); the MXFP4 format's blocks and scales
    (asked with their leading three dims, ``[E, 2I, in / 32]``) are not. gate = even rows
    (columns), up = odd ones; biases ``[E, 2I]`` / ``[E, H]``."""
    m = _STACKED.match(name)
    if m is None:
        return None
    prefix, num_experts, gate_up = m["prefix"], int(shape[0]), m["kind"] == "gate_up_proj"
    parts: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
    if m["bias"]:
        for e in range(num_experts):
            if gate_up:
                parts.append((f"{prefix}.{e}.gate_proj.bias", lambda t, e=e: t[e, 0::2]))
                parts.append((f"{prefix}.{e}.up_proj.bias", lambda t, e=e: t[e, 1::2]))
            else:
                parts.append((f"{prefix}.{e}.down_proj.bias", lambda t, e=e: t[e]))
        return parts
    if len(shape) != 3:
        return None
    # the last dim tells the layouts apart: out features when transposed, in / 32 for MXFP4 blocks
    transposed = shape[2] == (2 * intermediate if gate_up else hidden)
    for e in range(num_experts):
        if gate_up and transposed:
            parts.append((f"{prefix}.{e}.gate_proj.weight", lambda t, e=e: t[e, :, 0::2].t()))
            parts.append((f"{prefix}.{e}.up_proj.weight", lambda t, e=e: t[e, :, 1::2].t()))
        elif gate_up:
            parts.append((f"{prefix}.{e}.gate_proj.weight", lambda t, e=e: t[e, 0::2]))
            parts.append((f"{prefix}.{e}.up_proj.weight", lambda t, e=e: t[e, 1::2]))
        else:
            parts.append((f"{prefix}.{e}.down_proj.weight", (lambda t, e=e: t[e].t()) if transposed
                          else (lambda t, e=e: t[e])))
    return parts
