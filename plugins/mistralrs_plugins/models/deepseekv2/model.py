"""DeepSeek-V2 (and, through `.deepseekv3`, V3 / R1): multi-head latent attention (MLA) and a
mixture of experts with shared experts, on the shared decoder stack (HF DeepseekV2ForCausalLM
layout)::

    model.layers.N.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}
    model.layers.N.self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}
    model.layers.N.mlp.{gate,up,down}_proj                                  dense layers (< first_k_dense_replace)
    model.layers.N.mlp.gate.weight [E, H] (+ .e_score_correction_bias, V3)  the router
    model.layers.N.mlp.experts.E.{gate,up,down}_proj                        routed experts
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj                   shared experts

**MLA.** A token's keys and values come from one compressed latent ``c = norm(W_dkv x)``
(``kv_lora_rank`` dims) and one rope key ``k_pe`` (``qk_rope_head_dim`` dims) shared by every
head: ``k_h = [W_uk_h c, k_pe]``, ``v_h = W_uv_h c`` (``kv_b_proj`` = [W_uk; W_uv] per head).
The cache holds only ``[c, k_pe]``: one "KV head" of ``kv_lora_rank + qk_rope_head_dim`` dims
whose leading ``kv_lora_rank`` dims are also the value (`KVCacheShape.v_from_k`). Attention is
computed in the latent space by absorbing the up-projections into the query and the output
(exact, only the order of the matmuls changes)::

    q_lat_h = W_uk_h^T q_nope_h          score = q_lat_h . c + q_pe_h . k_pe   (scale unchanged)
    o_lat_h = softmax(score) @ c         o_h = W_uv_h o_lat_h

so every backend runs it as multi-query attention with Hq heads over one KV head, with the
paged cache, prefix caching and the batched decode kernel unchanged. ``MISTRALRS_NO_MLA=1``
(read when the model is built) runs the generic path instead: full per-head K/V are
expanded from the latent and cached (``num_heads`` KV heads of ``qk_nope + qk_rope`` / ``v_head_dim``).

**Rope.** Only the ``qk_rope_head_dim`` part rotates, in GPT-J pairs (V2 always; V3 when
``rope_interleave``, its default; the layout of the rotated dims differs from HF's V3 but q and k
agree, so the scores are the same). Yarn with ``mscale``/``mscale_all_dim``: the cos/sin carry
HF's attention factor and the softmax scale is ``qk_head_dim ** -0.5 * mscale(factor,
mscale_all_dim) ** 2``.

**Routing** (`GroupedTopkRouter`): float32 router logits; V2 softmax scores with ``greedy`` or
``group_limited_greedy`` (groups ranked by their best expert, experts outside the ``topk_group``
best groups scored 0); V3 sigmoid scores plus ``e_score_correction_bias`` for the choice only,
groups ranked by the sum of their two best (``noaux_tc``), the weights gathered from the
unbiased scores. V3 renormalises when ``norm_topk_prob`` and always multiplies by
``routed_scaling_factor``; V2 does either (renormalise when ``norm_topk_prob`` and top-k > 1,
else scale: DeepSeek's own V2 code and mistral.rs; transformers' V2 always scales and never
renormalises, which is the same for the published V2 configs, all ``norm_topk_prob: false``).
A layer is MoE when ``n_routed_experts`` is set, its index >= ``first_k_dense_replace`` and
divisible by ``moe_layer_freq`` (default 1).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, cast

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.decoder import CausalLM, DecoderLayer, DecoderSettings, cfg_get
from mistralrs.nn.linear import Linear, UnquantizedLinearMethod
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.moe import QWEN_EXPERT_NAMES, SparseMoE
from mistralrs.nn.norm import RMSNorm
from mistralrs_plugins.models.mixtral.model import split_fused_experts

NO_MLA_ENV = "MISTRALRS_NO_MLA"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mla_enabled() -> bool:
    """False when ``MISTRALRS_NO_MLA`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(NO_MLA_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_params(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


@attrs.frozen(kw_only=True)
class MlaSettings:
    """MLA sizes from config.json."""

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    scale: float
    absorb: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_config(cls, config: dict, *, arch: str) -> MlaSettings:
        g = lambda key, default=None: cfg_get(config, key, default, arch=arch)  # noqa: E731
        nope, rope = int(g("qk_nope_head_dim", 128)), int(g("qk_rope_head_dim", 64))
        q_lora = g("q_lora_rank")
        scale = (nope + rope) ** -0.5
        rp = _rope_params(config)
        if rp.get("rope_type", rp.get("type", "default")) not in ("default", None) and rp.get("mscale_all_dim"):
            m = yarn_mscale(float(rp["factor"]), float(rp["mscale_all_dim"]))
            scale *= m * m
        return cls(
            num_heads=int(g("num_attention_heads")), q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(g("kv_lora_rank", 512)), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
            v_head_dim=int(g("v_head_dim", 128)), attention_bias=bool(g("attention_bias", False)),
            scale=scale, absorb=mla_enabled(),
        )


class MultiHeadLatentAttention(nn.Module):
    """MLA (see the module docstring). ``forward(positions, hidden, batch) -> [T, H]``."""

    def __init__(self, hidden_size: int, m: MlaSettings, *, layer_idx: int, rotary: nn.Module | None,
                 device: Any = None, registry: Any = None) -> None:
        super().__init__()
        self.m = m
        self.layer_idx = layer_idx
        h = m.num_heads
        if m.q_lora_rank is None:
            self.q_proj = Linear(hidden_size, h * m.qk_head_dim)
        else:
            self.q_a_proj = Linear(hidden_size, m.q_lora_rank, bias=m.attention_bias)
            # HF builds the two latent norms with their default eps (1e-6), not rms_norm_eps
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, 1e-6, device=device, registry=registry)
            self.q_b_proj = Linear(m.q_lora_rank, h * m.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=m.attention_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, 1e-6, device=device, registry=registry)
        self.kv_b_proj = Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim))
        self.o_proj = Linear(h * m.v_head_dim, hidden_size, bias=m.attention_bias)
        object.__setattr__(self, "rotary", rotary)
        self._absorbed: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def _absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head for the absorbed matmuls, contiguous, in `dtype`:
        ``w_uk [H, nope, rank]`` and ``w_uv^T [H, rank, v]``. Made once (dequantized for quantized
        layers) and again only when the layer's weights or method change (re-ISQ)."""
        layer, m = self.kv_b_proj, self.m
        method = layer.quant_method
        weight = cast(torch.Tensor, layer.weight) if isinstance(method, UnquantizedLinearMethod) else None
        key = (method, dtype, None if weight is None else (weight.data_ptr(), weight._version))
        if self._absorbed is None or self._absorbed[0] != key:
            w = weight if weight is not None else method.dequantize(layer)  # type: ignore[attr-defined]
            w = w.detach().view(m.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
            w_uk = w[:, :m.qk_nope_head_dim].to(dtype).contiguous()
            w_uv_t = w[:, m.qk_nope_head_dim:].transpose(1, 2).to(dtype).contiguous()
            self._absorbed = (key, w_uk, w_uv_t)
        return self._absorbed[1], self._absorbed[2]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        m, t, h = self.m, hidden.shape[0], self.m.num_heads
        if m.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(t, h, m.qk_head_dim)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(hidden).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        k_pe = k_pe.reshape(t, 1, m.qk_rope_head_dim)
        if self.rotary is not None:
            q_pe, k_pe = cast(nn.Module, self.rotary)(q_pe.contiguous(), k_pe, positions)
        if m.absorb:
            w_uk, w_uv_t = self._absorbed_weights(hidden.dtype)
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, rank]
            query = torch.cat([q_lat, q_pe], dim=-1)
            key = torch.cat([c, k_pe[:, 0]], dim=-1).view(t, 1, m.kv_lora_rank + m.qk_rope_head_dim)
            out_lat = batch.backend.attend(self.layer_idx, query, key, key[..., :m.kv_lora_rank], batch,
                                           scale=m.scale)
            out = torch.bmm(out_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [T, H, v]
        else:
            kv = self.kv_b_proj(c).view(t, h, m.qk_nope_head_dim + m.v_head_dim)
            k_nope, value = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
            key = torch.cat([k_nope, k_pe.expand(t, h, m.qk_rope_head_dim)], dim=-1)
            query = torch.cat([q_nope, q_pe], dim=-1)
            out = batch.backend.attend(self.layer_idx, query, key, value.contiguous(), batch, scale=m.scale)
        return self.o_proj(out.reshape(t, h * m.v_head_dim))

    def extra_repr(self) -> str:
        m = self.m
        return (f"layer_idx={self.layer_idx}, heads={m.num_heads}, q_lora_rank={m.q_lora_rank}, "
                f"kv_lora_rank={m.kv_lora_rank}, rope_dim={m.qk_rope_head_dim}, absorb={m.absorb}")


class GroupedTopkRouter(nn.Module):
    """DeepSeek's router (see the module docstring): ``weight [E, H]`` (float32 matmul) and, for
    V3, ``e_score_correction_bias [E]``. ``select(forward(x))`` -> (weights [T, k] float32, ids [T, k])."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, scoring: str, topk_method: str,
                 n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
                 v3: bool) -> None:
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ModelLoadError(f"config.json: scoring_func {scoring!r} is not supported (softmax or sigmoid)")
        if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ModelLoadError(f"config.json: topk_method {topk_method!r} is not supported "
                                 "(greedy, group_limited_greedy or noaux_tc)")
        if n_group <= 0 or num_experts % n_group or not 0 < topk_group <= n_group:
            raise ModelLoadError(f"config.json: n_group ({n_group}) must divide n_routed_experts ({num_experts}) "
                                 f"and topk_group ({topk_group}) must be in [1, n_group]")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.topk_method, self.v3 = scoring, topk_method, v3
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        if v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def _group_mask(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        if self.v3:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        idx = group_scores.topk(self.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, idx, True)
        return mask[:, :, None].expand_as(grouped).reshape(choice.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 router logits [T, E]."""
        return F.linear(x.float(), self.weight.float())

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits -> (weights [T, k] float32, expert ids [T, k])."""
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.v3:
            choice = scores + self.e_score_correction_bias.float()
            if self.topk_method != "greedy":
                choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
            ids = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, ids)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return weights * self.routed_scaling_factor, ids
        if self.topk_method == "group_limited_greedy":
            scores = scores.masked_fill(~self._group_mask(scores), 0.0)
        weights, ids = scores.topk(self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids
        return weights * self.routed_scaling_factor, ids


class DeepseekMoE(SparseMoE):
    """Routed experts (`GroupedTopkRouter` as ``gate``) plus the always-on ``shared_experts``."""

    def __init__(self, hidden_size: int, moe_intermediate_size: int, router: GroupedTopkRouter,
                 n_shared_experts: int, hidden_act: str, *, shared_bias: bool = False) -> None:
        super().__init__(hidden_size, moe_intermediate_size, router.num_experts, router.top_k, hidden_act,
                         expert_names=QWEN_EXPERT_NAMES, routing_weights_in_model_dtype=False)
        self.gate = router  # replaces SparseMoE's plain linear router
        self.shared_experts = (GatedMLP(hidden_size, moe_intermediate_size * n_shared_experts, hidden_act,
                                        bias=shared_bias) if n_shared_experts else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router = cast(GroupedTopkRouter, self.gate)
        return router.select(router(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekDecoderLayer(DecoderLayer):
    v3: bool = False

    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        return MultiHeadLatentAttention(
            s.hidden_size, MlaSettings.from_config(s.config, arch=s.arch), layer_idx=layer_idx, rotary=rotary,
            device=getattr(ctx, "device", None) or "cpu", registry=getattr(ctx, "registry", None),
        )

    def is_moe_layer(self, s: DecoderSettings, layer_idx: int) -> bool:
        """MoE when ``n_routed_experts`` is set, the index >= ``first_k_dense_replace`` and
        divisible by ``moe_layer_freq``; families with another rule override this."""
        g = lambda key, default=None: cfg_get(s.config, key, default, arch=s.arch)  # noqa: E731
        freq = int(g("moe_layer_freq", 1) or 1)
        return bool(g(("n_routed_experts", "num_local_experts", "num_experts"))) and not (
            layer_idx < int(g("first_k_dense_replace", 0)) or layer_idx % freq)

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        cfg = s.config
        g = lambda key, default=None: cfg_get(cfg, key, default, arch=s.arch)  # noqa: E731
        if not self.is_moe_layer(s, layer_idx):
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act, bias=s.mlp_bias)
        num_experts = int(g(("n_routed_experts", "num_local_experts", "num_experts")))
        top_k = int(g("num_experts_per_tok"))
        if not 0 < top_k <= num_experts:
            raise ModelLoadError(f"config.json: num_experts_per_tok ({top_k}) must be in [1, {num_experts}]")
        topk_method = str(g("topk_method", "noaux_tc" if self.v3 else "greedy"))
        router = GroupedTopkRouter(
            s.hidden_size, num_experts, top_k,
            scoring=str(g("scoring_func", "sigmoid" if self.v3 else "softmax")), topk_method=topk_method,
            n_group=int(g("n_group", 1) or 1), topk_group=int(g("topk_group", 1) or 1),
            norm_topk_prob=bool(g("norm_topk_prob", self.v3)),
            routed_scaling_factor=float(g("routed_scaling_factor", 1.0)), v3=self.v3,
        )
        return DeepseekMoE(s.hidden_size, int(g("moe_intermediate_size")), router, int(g("n_shared_experts", 0) or 0),
                           s.hidden_act, shared_bias=s.mlp_bias)


class DeepseekV2ForCausalLM(CausalLM):
    arch_name = "deepseekv2"
    layer_cls = DeepseekDecoderLayer

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.mla = MlaSettings.from_config(config, arch=self.arch_name)
        rotary = self.model.rotary_emb
        if rotary is not None:
            # the decoupled rope key rotates in pairs (V2 always; V3 unless rope_interleave is false)
            rotary.interleaved = bool(config.get("rope_interleave", True))

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        rope = int(cfg_get(config, "qk_rope_head_dim", 64, arch=cls.arch_name))
        heads = int(cfg_get(config, "num_attention_heads", arch=cls.arch_name))
        return DecoderSettings.from_hf(
            config, arch=cls.arch_name, num_kv_heads=heads, head_dim=rope, rotary_dim=rope,
            qkv_bias=False, o_bias=False,
        )

    def kv_cache_shape(self) -> dict[str, int]:
        m = self.mla
        if m.absorb:
            return dict(num_layers=self.s.num_layers, num_kv_heads=1, head_dim=m.kv_lora_rank + m.qk_rope_head_dim,
                        v_head_dim=m.kv_lora_rank, v_from_k=True)
        return dict(num_layers=self.s.num_layers, num_kv_heads=m.num_heads, head_dim=m.qk_head_dim,
                    v_head_dim=m.v_head_dim)

    def map_checkpoint_name(self, name: str) -> str | None:
        m = _LAYER.match(name)
        if m is not None and int(m[1]) >= self.s.num_layers:
            return None  # V3's multi-token-prediction layers (num_nextn_predict_layers): not used
        return super().map_checkpoint_name(name)

    def split_checkpoint_tensor(self, name: str, shape: tuple[int, ...]):
        return split_fused_experts(name, shape, QWEN_EXPERT_NAMES)
