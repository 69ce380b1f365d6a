"""Granite 4.0 hybrid (HF GraniteMoeHybridForCausalLM): a decoder whose layers are Mamba-2
mixers or attention (``layer_types``: "mamba" / "linear_attention" or "attention" /
"full_attention"), each followed by a top-k MoE plus a shared MLP (or the shared MLP alone when
``num_local_experts`` is 0), with Granite's four scalars (`..granite.model`)::

    model.layers.N.mamba.{in_proj, conv1d.{weight [C, 1, K], bias}, dt_bias, A_log, D, norm.weight, out_proj}
    model.layers.N.self_attn.{q,k,v,o}_proj
    model.layers.N.block_sparse_moe.router.layer.weight [E, H]
    model.layers.N.block_sparse_moe.{input_linear [E, 2I, H], output_linear [E, H, I]}   stacked experts
    model.layers.N.shared_mlp.{input_linear [2I_s, H], output_linear}                     gate | up fused

**Mamba-2 mixer.** ``in_proj`` gives the gate z, ``xBC`` (x, B, C) and dt; ``xBC`` goes through a
causal depthwise conv (kernel ``mamba_d_conv``) and SiLU; dt = clamp(softplus(dt + dt_bias),
``time_step_limit``); the selective scan h_t = exp(dt A) h_{t-1} + dt B_t x_t, y_t = C_t h_t + D x_t
per head (``mamba_n_heads`` of ``mamba_d_head``, B/C shared by ``mamba_n_groups`` groups of
heads); then a gated RMSNorm per group (y * silu(z)) and ``out_proj``. Its state per sequence
is the conv's last K - 1 inputs and the [heads, head_dim, d_state] SSM state (float32), kept in
the recurrent-state cache (`mistralrs.state_cache`); prefill chunks run the chunked SSD scan,
decode tokens one batched recurrent step (`mistralrs.nn.recurrent`). Prefix caching is off for
this model (a cached prefix's SSM state is not kept).

Only attention layers take KV-cache blocks: they are numbered among themselves, as the Mamba
layers are among theirs. Routing: top-k of the router logits, softmax over those k (weights in
the model dtype). Rope only when ``position_embedding_type`` is "rope" (Granite 4.0 uses none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.activation import get_activation
from mistralrs.nn.attention import Attention
from mistralrs.nn.decoder import CausalLM, DecoderSettings, cfg_get
from mistralrs.nn.linear import Linear
from mistralrs.nn.moe import QWEN_EXPERT_NAMES, SparseMoE
from mistralrs.nn.norm import RMSNorm
from mistralrs.nn.recurrent import (
    DepthwiseConv1d,
    causal_conv1d,
    causal_conv1d_step,
    mamba2_chunked,
    mamba2_step,
    scan_sequences,
)
from mistralrs_plugins.models.granite.model import GraniteEmbedding, granite_scalar
from mistralrs_plugins.models.mixtral.model import split_fused_experts

MAMBA_TYPES = ("mamba", "linear_attention")
ATTENTION_TYPES = ("attention", "full_attention")


def hybrid_layer_types(config: dict, num_layers: int) -> list[str]:
    """Each layer's kind, "mamba" or "attention" (default: every layer Mamba, as HF)."""
    types = config.get("layer_types") or config.get("layers_block_type") or ["mamba"] * num_layers
    if len(types) != num_layers or any(t not in MAMBA_TYPES + ATTENTION_TYPES for t in types):
        raise ModelLoadError(f"config.json: layer_types must give one of {MAMBA_TYPES + ATTENTION_TYPES} for each "
                             f"of the {num_layers} layers, got {types!r}")
    return ["mamba" if t in MAMBA_TYPES else "attention" for t in types]


def _json_float(value: Any) -> float:
    """A float from config.json; transformers writes infinities as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"config.json: time_step_limit entries must be numbers, got {value!r}") from None


class Mamba2Mixer(nn.Module):
    """Mamba-2 (see the module docstring). ``state_idx``: this layer's number among the recurrent
    layers (its states in the recurrent-state cache)."""

    def __init__(self, config: dict, hidden_size: int, eps: float, *, state_idx: int, arch: str) -> None:
        super().__init__()
        g = lambda key, default=None: cfg_get(config, key, default, arch=arch)  # noqa: E731
        self.state_idx = state_idx
        self.num_heads = int(g("mamba_n_heads", 128))
        self.n_groups = int(g("mamba_n_groups", 1))
        self.d_state = int(g("mamba_d_state", 256))
        self.d_conv = int(g("mamba_d_conv", 4))
        self.intermediate = int(g("mamba_expand", 2)) * hidden_size
        head_dim = g("mamba_d_head", "auto")
        self.head_dim = self.intermediate // self.num_heads if head_dim == "auto" else int(head_dim)
        if self.head_dim * self.num_heads != self.intermediate or self.num_heads % self.n_groups:
            raise ModelLoadError(f"config.json: mamba_n_heads ({self.num_heads}) x mamba_d_head ({self.head_dim}) must "
                                 f"equal mamba_expand x hidden_size ({self.intermediate}), and mamba_n_groups must "
                                 "divide mamba_n_heads")
        self.chunk_size = int(g("mamba_chunk_size", 256))
        limit = g("time_step_limit", None) or (0.0, float("inf"))
        self.dt_min, self.dt_max = (_json_float(v) for v in limit)
        self.conv_dim = self.intermediate + 2 * self.n_groups * self.d_state
        bias = bool(g("mamba_proj_bias", False))
        self.in_proj = Linear(hidden_size, self.intermediate + self.conv_dim + self.num_heads, bias=bias)
        self.conv1d = DepthwiseConv1d(self.conv_dim, self.d_conv, bool(g("mamba_conv_bias", True)))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(self.intermediate), requires_grad=False)
        self.eps = float(eps)
        self.out_proj = Linear(self.intermediate, hidden_size, bias=bias)
        self.act = get_activation(str(g("hidden_act", "silu")))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv": (self.conv_dim, self.d_conv - 1), "ssm": (self.num_heads, self.head_dim, self.d_state)}

    def _split(self, xbc: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, b, c = xbc.split([self.intermediate, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        return (x.reshape(n, self.num_heads, self.head_dim), b.reshape(n, self.n_groups, self.d_state),
                c.reshape(n, self.n_groups, self.d_state))

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        return torch.clamp(F.softplus(dt + self.dt_bias.to(dt.dtype)), self.dt_min, self.dt_max)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        dtype = hidden.dtype
        gate, xbc, dt = self.in_proj(hidden).split([self.intermediate, self.conv_dim, self.num_heads], dim=-1)
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        a = -torch.exp(self.A_log.float())

        def step(rows, st):
            y, conv = causal_conv1d_step(rows[0], st["conv"], weight, bias)
            x, b, c = self._split(self.act(y), y.shape[0])
            out, ssm = mamba2_step(x, self._dt(rows[1]), a, b, c, self.D, st["ssm"])
            return out.reshape(y.shape[0], -1), {"conv": conv, "ssm": ssm}

        def chunk(rows, st):
            y, conv = causal_conv1d(rows[0], st["conv"], weight, bias)
            x, b, c = self._split(self.act(y), y.shape[0])
            out, ssm = mamba2_chunked(x, self._dt(rows[1]), a, b, c, self.D, st["ssm"], self.chunk_size)
            return out.reshape(y.shape[0], -1), {"conv": conv, "ssm": ssm}

        states = batch.backend.read_state(self.state_idx, batch, device=hidden.device)
        y, states = scan_sequences(batch, (xbc, dt), states, step, chunk)
        batch.backend.write_state(self.state_idx, batch, states)
        # gated RMSNorm per group, in float32 (HF's RMSNormGated)
        y = y.float() * F.silu(gate.float())
        grouped = y.view(y.shape[0], self.n_groups, -1)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.norm.weight * grouped.view_as(y)
        return self.out_proj(y.to(dtype))

    def extra_repr(self) -> str:
        return (f"state_idx={self.state_idx}, heads={self.num_heads}, head_dim={self.head_dim}, "
                f"d_state={self.d_state}, groups={self.n_groups}, d_conv={self.d_conv}")


class SharedMLP(nn.Module):
    """down(act(gate) * up) with the fused ``input_linear`` = [gate | up] and ``output_linear``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.input_linear = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.output_linear = Linear(intermediate_size, hidden_size, bias=False)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(self.act(gate) * up)


class TopKSoftmaxMoE(SparseMoE):
    """Top-k of the router logits (float32), softmax over those k, weights in the model dtype."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, ids = self.router(x).float().topk(self.top_k, dim=-1)
        return torch.softmax(logits, dim=-1), ids


class GraniteMoeHybridDecoderLayer(nn.Module):
    """norm -> Mamba-2 or attention -> residual (x residual_multiplier); norm -> MoE + shared MLP."""

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__()
        cfg = s.config
        self.layer_idx = layer_idx
        device, registry = getattr(ctx, "device", None) or "cpu", getattr(ctx, "registry", None)
        self.input_layernorm = RMSNorm(s.hidden_size, s.norm_eps, device=device, registry=registry)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.norm_eps, device=device, registry=registry)
        types = hybrid_layer_types(cfg, s.num_layers)
        index = types[:layer_idx].count(types[layer_idx])  # numbered among layers of its kind
        if types[layer_idx] == "mamba":
            self.mamba = Mamba2Mixer(cfg, s.hidden_size, s.norm_eps, state_idx=index, arch=s.arch)
        else:
            self.self_attn = Attention(
                s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, layer_idx=index, rotary=rotary,
                qkv_bias=s.qkv_bias, o_bias=s.o_bias, scale=s.attn_scale, device=device, registry=registry,
            )
        num_experts = int(cfg.get("num_local_experts") or 0)
        if num_experts > 0:
            top_k = int(cfg_get(cfg, "num_experts_per_tok", 2, arch=s.arch))
            if not 0 < top_k <= num_experts:
                raise ModelLoadError(f"config.json: num_experts_per_tok ({top_k}) must be in [1, {num_experts}]")
            self.block_sparse_moe = TopKSoftmaxMoE(
                s.hidden_size, s.intermediate_size, num_experts, top_k, s.hidden_act,
                expert_names=QWEN_EXPERT_NAMES, routing_weights_in_model_dtype=True)
        self.shared_mlp = SharedMLP(s.hidden_size, int(cfg_get(cfg, "shared_intermediate_size", 1024, arch=s.arch)),
                                    s.hidden_act)
        self.residual_multiplier = granite_scalar(cfg, "residual_multiplier")

    @property
    def mixer(self) -> nn.Module:
        return self.mamba if hasattr(self, "mamba") else self.self_attn

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, "block_sparse_moe", self.shared_mlp)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        hidden = hidden + self.mixer(positions, self.input_layernorm(hidden), batch) * self.residual_multiplier
        h = self.post_attention_layernorm(hidden)
        out = self.shared_mlp(h)
        if hasattr(self, "block_sparse_moe"):
            out = self.block_sparse_moe(h) + out
        return hidden + out * self.residual_multiplier


class GraniteMoeHybridForCausalLM(CausalLM):
    arch_name = "granitemoehybrid"
    layer_cls = GraniteMoeHybridDecoderLayer  # type: ignore[assignment]
    # the stacked experts and the router as our per-expert layout names them (then split)
    checkpoint_name_map = (
        (r"\.block_sparse_moe\.router\.layer\.", ".block_sparse_moe.gate."),
        (r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
        (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
    )

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.model.embed_tokens = GraniteEmbedding(
            self.s.vocab_size, self.s.hidden_size, multiplier=granite_scalar(config, "embedding_multiplier"))
        self.logits_scaling = granite_scalar(config, "logits_scaling")
        self.layer_types = hybrid_layer_types(config, self.s.num_layers)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, attn_scale=granite_scalar(config, "attention_multiplier"),
            use_rotary=config.get("position_embedding_type") == "rope",
            norm_eps=float(cfg_get(config, "rms_norm_eps", 1e-6, arch=cls.arch_name)),
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        return logits / self.logits_scaling if self.logits_scaling != 1.0 else logits

    def kv_cache_shape(self) -> dict[str, int]:
        shape = super().kv_cache_shape()
        return {**shape, "num_layers": self.layer_types.count("attention")}

    def recurrent_state_shape(self) -> dict[str, Any]:
        mixers = [layer.mamba for layer in self.model.layers if hasattr(layer, "mamba")]
        if not mixers:
            return {}
        return {"num_layers": len(mixers), "states": mixers[0].state_shapes(), "float32": ("ssm",)}

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, QWEN_EXPERT_NAMES)
