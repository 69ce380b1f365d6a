"""Qwen3-Next (HF Qwen3NextForCausalLM): a hybrid decoder whose layers are Gated DeltaNet linear
attention or gated softmax attention (``layer_types``; by default every
``full_attention_interval``-th layer is attention), each followed by a sparse MoE with a gated
shared expert (or a dense MLP on ``mlp_only_layers`` / off ``decoder_sparse_step``)::

    model.layers.N.linear_attn.{in_proj_qkvz, in_proj_ba, conv1d.weight [C, 1, K], dt_bias, A_log,
                                norm.weight, out_proj}
    model.layers.N.self_attn.{q_proj [2 H D, hidden], k_proj, v_proj, o_proj, q_norm, k_norm}
    model.layers.N.mlp.{gate, experts.E.{gate,up,down}_proj, shared_expert.{gate,up,down}_proj,
                        shared_expert_gate [1, hidden]}

Every RMSNorm (layer norms, final norm, q/k norms) scales by ``1 + weight``, in float32.

**Gated attention.** ``q_proj`` gives, per head, the query and an output gate; q and k get the
per-head norm and NeoX rope on ``partial_rotary_factor`` (0.25) of the head; the attention output
is multiplied by ``sigmoid(gate)`` before ``o_proj``.

**Gated DeltaNet.** ``in_proj_qkvz`` / ``in_proj_ba`` are laid out per key-head group (q, k, the
group's v heads, their z; then b, a); q|k|v go through a causal depthwise conv (kernel
``linear_conv_kernel_dim``, no bias) and SiLU; q and k are L2-normalised, q scaled by
``dk ** -0.5``; beta = sigmoid(b), decay g = -exp(A_log) * softplus(a + dt_bias). The state per
value head is a [dk, dv] matrix: S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S^T k_t))^T,
o_t = S_t^T q_t (`mistralrs.nn.recurrent`: chunked for prefill, one step for decode). The output
gets a per-head RMSNorm (weight, not 1 + weight) times silu(z), then ``out_proj``. Per sequence
the conv's last K - 1 inputs and the float32 [Hv, dk, dv] states live in the recurrent-state
cache (prefix caching is off for this model).

**MoE.** float32 softmax top-k (renormalised when ``norm_topk_prob``), weights in the model
dtype, plus ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.linear import Linear
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.moe import QWEN_EXPERT_NAMES, SparseMoE
from mistralrs.nn.norm import RMSNorm
from mistralrs.nn.recurrent import (
    DepthwiseConv1d,
    causal_conv1d,
    causal_conv1d_step,
    gated_delta_chunked,
    gated_delta_step,
    scan_sequences,
)
from mistralrs_plugins.models.mixtral.model import split_fused_experts
from mistralrs_plugins.models.qwen3moe.model import is_sparse_layer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def qwen3next_layer_types(config: dict, num_layers: int) -> list[str]:
    types = config.get("layer_types")
    if types is None:
        interval = int(config.get("full_attention_interval", 4))
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"linear_attention", "full_attention"}:
        raise ModelLoadError(f"config.json: layer_types must give 'linear_attention' or 'full_attention' for each of "
                             f"the {num_layers} layers, got {types!r}")
    return list(types)


class GatedAttention(nn.Module):
    """Qwen3-Next's attention (see the module docstring); ``layer_idx``: its KV-cache index."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        device, registry = getattr(ctx, "device", None) or "cpu", getattr(ctx, "registry", None)
        self.q_proj = Linear(s.hidden_size, 2 * s.num_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.qkv_bias)
        self.q_norm = RMSNorm(s.head_dim, s.norm_eps, add_unit_offset=True, device=device, registry=registry)
        self.k_norm = RMSNorm(s.head_dim, s.norm_eps, add_unit_offset=True, device=device, registry=registry)
        object.__setattr__(self, "rotary", rotary)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        t, h, d = hidden.shape[0], self.num_heads, self.head_dim
        q, gate = self.q_proj(hidden).view(t, h, 2 * d).chunk(2, dim=-1)
        q = self.q_norm(q.contiguous())
        k = self.k_norm(self.k_proj(hidden).view(t, self.num_kv_heads, d))
        v = self.v_proj(hidden).view(t, self.num_kv_heads, d)
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        out = batch.backend.attend(self.layer_idx, q, k, v, batch, scale=d ** -0.5)
        return self.o_proj(out.reshape(t, h * d) * torch.sigmoid(gate.reshape(t, h * d)))


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear attention (see the module docstring); ``state_idx``: its number among
    the recurrent layers."""

    def __init__(self, config: dict, hidden_size: int, eps: float, *, state_idx: int, arch: str) -> None:
        super().__init__()
        g = lambda key, default=None: cfg_get(config, key, default, arch=arch)  # noqa: E731
        self.state_idx = state_idx
        self.num_v_heads, self.num_k_heads = int(g("linear_num_value_heads", 32)), int(g("linear_num_key_heads", 16))
        self.head_k_dim, self.head_v_dim = int(g("linear_key_head_dim", 128)), int(g("linear_value_head_dim", 128))
        if self.num_v_heads % self.num_k_heads:
            raise ModelLoadError(f"config.json: linear_num_key_heads ({self.num_k_heads}) must divide "
                                 f"linear_num_value_heads ({self.num_v_heads})")
        self.key_dim, self.value_dim = self.head_k_dim * self.num_k_heads, self.head_v_dim * self.num_v_heads
        self.kernel = int(g("linear_conv_kernel_dim", 4))
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(hidden_size, 2 * self.num_v_heads, bias=False)
        self.conv1d = DepthwiseConv1d(self.conv_dim, self.kernel, False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(self.head_v_dim), requires_grad=False)
        self.eps = float(eps)
        self.out_proj = Linear(self.value_dim, hidden_size, bias=False)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv": (self.conv_dim, self.kernel - 1),
                "delta": (self.num_v_heads, self.head_k_dim, self.head_v_dim)}

    def _split_projections(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t, r = hidden.shape[0], self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(hidden).view(t, self.num_k_heads, -1)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, r * self.head_v_dim, r * self.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(hidden).view(t, self.num_k_heads, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        return qkv, z.reshape(t, self.num_v_heads, self.head_v_dim), b.reshape(t, -1), a.reshape(t, -1)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        dtype = hidden.dtype
        qkv, z, b, a = self._split_projections(hidden)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        weight = self.conv1d.weight[:, 0]

        def heads(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = F.silu(y).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            n = y.shape[0]
            return (q.reshape(n, self.num_k_heads, self.head_k_dim), k.reshape(n, self.num_k_heads, self.head_k_dim),
                    v.reshape(n, self.num_v_heads, self.head_v_dim))

        def step(rows, st):
            y, conv = causal_conv1d_step(rows[0], st["conv"], weight, None)
            out, delta = gated_delta_step(*heads(y), rows[1], rows[2], st["delta"])
            return out, {"conv": conv, "delta": delta}

        def chunk(rows, st):
            y, conv = causal_conv1d(rows[0], st["conv"], weight, None)
            out, delta = gated_delta_chunked(*heads(y), rows[1], rows[2], st["delta"])
            return out, {"conv": conv, "delta": delta}

        states = batch.backend.read_state(self.state_idx, batch, device=hidden.device)
        out, states = scan_sequences(batch, (qkv, g, beta), states, step, chunk)
        batch.backend.write_state(self.state_idx, batch, states)
        # per-head gated RMSNorm (HF's Qwen3NextRMSNormGated: norm, weight, then silu(z), in the model dtype)
        out = out.to(dtype)
        normed = out.float() * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + self.eps)
        out = (self.norm.weight * normed.to(dtype)) * F.silu(z.float())
        return self.out_proj(out.to(dtype).reshape(out.shape[0], -1))


class SharedExpertMoE(SparseMoE):
    """Top-k experts plus ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``."""

    def __init__(self, hidden_size: int, moe_intermediate: int, shared_intermediate: int, num_experts: int,
                 top_k: int, hidden_act: str, *, norm_topk_prob: bool) -> None:
        super().__init__(hidden_size, moe_intermediate, num_experts, top_k, hidden_act, norm_topk_prob=norm_topk_prob,
                         expert_names=QWEN_EXPERT_NAMES, routing_weights_in_model_dtype=True)
        self.shared_expert = GatedMLP(hidden_size, shared_intermediate, hidden_act)
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen3NextDecoderLayer(DecoderLayer):
    """The shared pre-norm block; a Gated DeltaNet layer's operator is ``linear_attn`` (HF's name)."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__(s, layer_idx, rotary, ctx)
        if isinstance(self.self_attn, GatedDeltaNet):
            self.linear_attn = self.self_attn
            del self.self_attn

    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        types = qwen3next_layer_types(s.config, s.num_layers)
        index = types[:layer_idx].count(types[layer_idx])  # numbered among layers of its kind
        if types[layer_idx] == "linear_attention":
            return GatedDeltaNet(s.config, s.hidden_size, s.norm_eps, state_idx=index, arch=s.arch)
        return GatedAttention(s, index, rotary, ctx)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        cfg = s.config
        g = lambda key, default=None: cfg_get(cfg, key, default, arch=s.arch)  # noqa: E731
        num_experts, top_k = int(g("num_experts", 512)), int(g("num_experts_per_tok", 10))
        if not is_sparse_layer(cfg, layer_idx, num_experts):
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act)
        if not 0 < top_k <= num_experts:
            raise ModelLoadError(f"config.json: num_experts_per_tok ({top_k}) must be in [1, {num_experts}]")
        return SharedExpertMoE(s.hidden_size, int(g("moe_intermediate_size", 512)),
                               int(g("shared_expert_intermediate_size", 512)), num_experts, top_k, s.hidden_act,
                               norm_topk_prob=bool(g("norm_topk_prob", True)))

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if hasattr(self, "linear_attn") else self.self_attn

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        hidden = hidden + self.mixer(positions, self.input_layernorm(hidden), batch)
        return hidden + self.ffn(self.post_attention_layernorm(hidden))


class Qwen3NextForCausalLM(CausalLM):
    arch_name = "qwen3next"
    layer_cls = Qwen3NextDecoderLayer

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.layer_types = qwen3next_layer_types(config, self.s.num_layers)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return DecoderSettings.from_hf(config, arch=cls.arch_name, norm_unit_offset=True)

    def kv_cache_shape(self) -> dict[str, int]:
        return {**super().kv_cache_shape(), "num_layers": self.layer_types.count("full_attention")}

    def recurrent_state_shape(self) -> dict[str, Any]:
        nets = [layer.linear_attn for layer in self.model.layers if hasattr(layer, "linear_attn")]
        if not nets:
            return {}
        return {"num_layers": len(nets), "states": nets[0].state_shapes(), "float32": ("delta",)}

    def map_checkpoint_name(self, name: str) -> str | None:
        m = _LAYER.match(name)
        if name.startswith("mtp.") or (m is not None and int(m[1]) >= self.s.num_layers):
            return None  # the multi-token-prediction head: not used
        return super().map_checkpoint_name(name)

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, QWEN_EXPERT_NAMES)
