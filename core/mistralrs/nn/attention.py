"""The attention layer models use: projections, optional QK-norm, rotary, then the backend.

The layer never looks inside the `AttentionBatch`; it hands q/k/v for the step's new tokens to
``batch.backend.attend(layer_idx, q, k, v, batch, scale=..., sliding_window=..., softcap=...)``,
which writes k/v into the cache and attends (GQA included: k/v keep their own head count).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import RMSNorm


class Attention(nn.Module):
    """Multi-head / grouped-query attention.

    qk_norm: None, "head" (RMSNorm over each head's dim, Qwen3/Gemma3), "head_post_rope" (the
    same after the rotary, HunYuan) or "full" (RMSNorm over the whole q/k projection, OLMo2). `scale` defaults to head_dim ** -0.5 (Gemma2: pass
    query_pre_attn_scalar ** -0.5). `rotary` is shared between layers and not registered as a
    submodule here (the model owns it, as HF's ``model.rotary_emb``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        layer_idx: int,
        rotary: nn.Module | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        v_head_dim: int | None = None,
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        qk_norm_unit_offset: bool = False,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        sinks: bool = False,
        names: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        device: Any = None,
        registry: Any = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.layer_idx = int(layer_idx)
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.v_head_dim = int(v_head_dim or head_dim)
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5
        self.sliding_window = int(sliding_window) if sliding_window else None
        self.softcap = float(softcap) if softcap else None
        self.names = tuple(names)
        q, k, v, o = self.names
        setattr(self, q, Linear(hidden_size, self.num_heads * self.head_dim, bias=qkv_bias))
        setattr(self, k, Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias))
        setattr(self, v, Linear(hidden_size, self.num_kv_heads * self.v_head_dim, bias=qkv_bias))
        setattr(self, o, Linear(self.num_heads * self.v_head_dim, hidden_size, bias=o_bias))
        self.qk_norm = qk_norm
        if qk_norm in ("head", "head_post_rope"):
            self.q_norm = RMSNorm(self.head_dim, qk_norm_eps, add_unit_offset=qk_norm_unit_offset, device=device, registry=registry)
            self.k_norm = RMSNorm(self.head_dim, qk_norm_eps, add_unit_offset=qk_norm_unit_offset, device=device, registry=registry)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * self.head_dim, qk_norm_eps, add_unit_offset=qk_norm_unit_offset,
                                  device=device, registry=registry)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, qk_norm_eps, add_unit_offset=qk_norm_unit_offset,
                                  device=device, registry=registry)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm must be None, 'head', 'head_post_rope' or 'full', not {qk_norm!r}")
        object.__setattr__(self, "rotary", rotary)
        # GPT-OSS: a learned logit per query head in every softmax's denominator (`attend(sinks=)`)
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False) if sinks else None

    _qkv: Linear | None = None  # quantized q/k/v fused after loading (not a submodule)

    def after_loading(self) -> None:
        """Quantized q, k and v of one type become one matmul (their states are views of it)."""
        from mistralrs.nn.quantized import fuse_rows

        fused = fuse_rows([getattr(self, n) for n in self.names[:3]])
        if fused is not None:
            object.__setattr__(self, "_qkv", fused)

    def _project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_proj, k_proj, v_proj = (getattr(self, n) for n in self.names[:3])
        fused = self._qkv
        if fused is not None:
            from mistralrs.nn.quantized import still_fused

            if still_fused(fused, [q_proj, k_proj, v_proj]):
                q, k, v = fused(hidden).split([q_proj.out_features, k_proj.out_features, v_proj.out_features], -1)
                return q, k, v
            self._qkv = None
        return q_proj(hidden), k_proj(hidden), v_proj(hidden)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        o_proj = getattr(self, self.names[3])
        t = hidden.shape[0]
        q, k, v = self._project(hidden)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.v_head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            # set with object.__setattr__, so mypy sees nn.Module.__getattr__'s Tensor | Module
            q, k = cast(nn.Module, self.rotary)(q, k, positions)
        if self.qk_norm == "head_post_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        out = batch.backend.attend(
            self.layer_idx, q, k, v, batch,
            scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap,
            **({} if self.sinks is None else {"sinks": self.sinks}),
        )
        return o_proj(out.reshape(t, self.num_heads * self.v_head_dim))

    def extra_repr(self) -> str:
        return (f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, sliding_window={self.sliding_window}, softcap={self.softcap}")
