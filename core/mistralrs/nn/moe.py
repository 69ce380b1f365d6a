"""Top-k mixture of experts (Mixtral, Qwen2/3-MoE style).

Routing: softmax over the router logits in float32, top-k, optionally renormalised to sum to
one (`norm_topk_prob`; Mixtral always renormalises). The experts are a ModuleList of gated
MLPs whose submodule names are configurable, so checkpoint names map one to one:
``experts.N.w1/w2/w3`` (Mixtral: w1 = gate, w3 = up, w2 = down) or
``experts.N.gate_proj/up_proj/down_proj`` (Qwen). The forward loops over the experts that got
tokens: simple and exact. Where a fused kernel of the op ``moe_experts`` claims the device (Triton on
cuda) and the experts are plain silu gated MLPs, `after_loading` restacks their weights into one
[E, 2I, H] and one [E, H, I] tensor (the experts' parameters become views of them) and the forward runs
the kernel on all experts at once; its torch reference (`nn.torch_ops.moe_experts`) is this loop. Experts of
one GGML block type (GGUF, UQFF, ``--isq q4k``: a quantized method with a per-row ``qweight``) are restacked
the same way as bytes, [E, 2I, row bytes] and [E, H, row bytes], for ``moe_experts_ggml``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.linear import Linear, UnquantizedLinearMethod
from mistralrs.nn.mlp import GatedMLP

MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")  # (gate, up, down)
QWEN_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def route_topk(
    router_logits: torch.Tensor, top_k: int, *, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """out = sum_k w_k * expert_{id_k}(x) over each token's top-k experts.

    `routing_weights_in_model_dtype`: Qwen-MoE casts the routing weights to the model dtype
    before scaling the expert outputs; Mixtral scales in float32. (Identical in fp32.)
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        hidden_act: str = "silu",
        *,
        norm_topk_prob: bool = True,
        expert_names: Sequence[str] = QWEN_EXPERT_NAMES,
        gate_name: str = "gate",
        experts_name: str = "experts",
        gate_bias: bool = False,
        routing_weights_in_model_dtype: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.norm_topk_prob = bool(norm_topk_prob)
        self.gate_name = gate_name
        self.experts_name = experts_name
        self.routing_weights_in_model_dtype = routing_weights_in_model_dtype
        self.expert_names = tuple(expert_names)  # (gate, up, down) projections of each expert
        setattr(self, gate_name, Linear(hidden_size, self.num_experts, bias=gate_bias))
        setattr(self, experts_name, nn.ModuleList(
            GatedMLP(hidden_size, intermediate_size, hidden_act, names=expert_names) for _ in range(self.num_experts)
        ))

    def stacked_expert_keys(self) -> list[tuple[str, list[str]]]:
        """[(stacked key, [per-expert names])] relative to this module: mistral.rs stores each
        projection of all experts as one ``experts.gate_proj|up_proj|down_proj`` [E, out, in]."""
        e = self.experts_name
        return [(f"{e}.{canonical}", [f"{e}.{i}.{name}" for i in range(self.num_experts)])
                for canonical, name in zip(QWEN_EXPERT_NAMES, self.expert_names)]

    @property
    def router(self) -> Linear:
        return getattr(self, self.gate_name)

    @property
    def expert_list(self) -> nn.ModuleList:
        return getattr(self, self.experts_name)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k]); families with other routing
        (DeepSeek's grouped top-k, GPT-OSS's biased router) override this."""
        return route_topk(self.router(x), self.top_k, norm_topk_prob=self.norm_topk_prob)

    _stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (w13 [E, 2I, H], w2 [E, H, I]), not state
    _moe_kernel: Callable[..., torch.Tensor] | None = None
    _stacked_as: tuple[type, str] = (UnquantizedLinearMethod, "weight")  # the experts' method and stacked state

    def after_loading(self) -> None:
        """Where a fused ``moe_experts`` kernel claims the device, restack plain silu experts' weights into
        w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]; each expert's parameters (and its fused
        gate/up layer's) become views of them, so no memory is added and checkpoint names stay."""
        from mistralrs.nn.kernels import lookup_accelerated

        if any(type(m) is not GatedMLP for m in self.expert_list):
            return
        experts = [cast(GatedMLP, m) for m in self.expert_list]
        if not experts or any(m.act_fn is not F.silu for m in experts):
            return
        layers = [[getattr(m, n) for n in m.names] for m in experts]
        if any(lin.bias is not None for trio in layers for lin in trio):
            return
        if any(type(lin.quant_method) is not UnquantizedLinearMethod for trio in layers for lin in trio):
            self._stack_ggml(experts, layers)
            return
        w = layers[0][0].weight
        if w.is_meta or any(lin.weight.dtype != w.dtype or lin.weight.device != w.device
                            for trio in layers for lin in trio):
            return
        inter, hidden = w.shape
        if any(g.weight.shape != (inter, hidden) or u.weight.shape != (inter, hidden)
               or d.weight.shape != (hidden, inter) for g, u, d in layers):
            return
        kernel = lookup_accelerated("moe_experts", w.device)
        if kernel is None:
            return
        w13 = torch.empty(len(experts), 2 * inter, hidden, dtype=w.dtype, device=w.device)
        w2 = torch.empty(len(experts), hidden, inter, dtype=w.dtype, device=w.device)
        for e, (mlp, (g, u, d)) in enumerate(zip(experts, layers)):
            w13[e, :inter], w13[e, inter:], w2[e] = g.weight, u.weight, d.weight
            for lin, part in ((g, w13[e, :inter]), (u, w13[e, inter:]), (d, w2[e])):
                view = nn.Parameter(part, requires_grad=False)
                view.__dict__.update(lin.weight.__dict__)  # keep loader attributes
                lin.weight = view
            fused = mlp._gate_up
            if fused is not None:  # the expert's own fused gate/up matmul stays valid
                fused.weight = nn.Parameter(w13[e], requires_grad=False)
        self._stacked = (w13, w2)
        self._moe_kernel = kernel

    def _stack_ggml(self, experts: list[GatedMLP], layers: list[list[Linear]]) -> None:
        """Experts of one GGML block type (a method with a ``qtype`` and a per-row ``qweight``, as the GGML
        quantizer plugin's): their bytes restacked into w13 [E, 2I, row bytes] and w2 [E, H, row bytes] for a
        fused ``moe_experts_ggml`` kernel (Triton on cuda); each expert's states (and its fused gate/up's)
        become views of them."""
        from mistralrs.nn.kernels import lookup_accelerated
        from mistralrs.nn.quantized import still_fused

        first = layers[0][0].quant_method
        qtype = getattr(first, "qtype", None)
        if qtype is None or not getattr(first, "rows_state", False):
            return
        for trio in layers:
            for lin in trio:
                m = lin.quant_method
                if (type(m) is not type(first) or getattr(m, "qtype", None) != qtype
                        or tuple(getattr(lin, "_quant_state_names", ())) != ("qweight",)):
                    return
        qw = [[cast(torch.Tensor, lin._buffers["qweight"]) for lin in trio] for trio in layers]
        q = qw[0][0]
        if q.dtype != torch.uint8 or q.is_meta:
            return
        if any(t.shape[0] != lin.out_features for trio, ts in zip(layers, qw) for lin, t in zip(trio, ts)):
            return  # a state packing several rows into one (a CPU kernel's layout): not this kernel's
        shapes = (q.shape, qw[0][2].shape)
        if any(g.shape != shapes[0] or u.shape != shapes[0] or d.shape != shapes[1]
               or any(t.device != q.device for t in (g, u, d)) for g, u, d in qw):
            return
        kernel = lookup_accelerated("moe_experts_ggml", q.device)
        if kernel is None:
            return
        for mlp in experts:  # each expert's gate/up fused first (its own after_loading then keeps it)
            mlp.after_loading()
        (inter, row_h), (hidden, row_i) = shapes
        w13 = torch.empty(len(experts), 2 * inter, row_h, dtype=torch.uint8, device=q.device)
        w2 = torch.empty(len(experts), hidden, row_i, dtype=torch.uint8, device=q.device)
        for e, (mlp, (g, u, d)) in enumerate(zip(experts, layers)):
            fused = mlp._gate_up_q if still_fused(mlp._gate_up_q, [g, u]) else None
            w13[e, :inter], w13[e, inter:], w2[e] = (cast(torch.Tensor, lin._buffers["qweight"]) for lin in (g, u, d))
            g._buffers["qweight"], u._buffers["qweight"], d._buffers["qweight"] = w13[e, :inter], w13[e, inter:], w2[e]
            if fused is not None:  # the expert's own fused gate/up matmul stays valid
                fused._buffers["qweight"] = w13[e]
        self._stacked = (w13, w2)
        self._stacked_as = (type(first), "qweight")
        self._moe_kernel = functools.partial(kernel, qtype=qtype)

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacked weights while the first and last experts' still are their views (a quantizer or a
        caller replacing weights ends the stacking)."""
        stacked = self._stacked
        if stacked is None:
            return None
        experts = self.expert_list
        method, state = self._stacked_as
        for e in (0, len(experts) - 1):
            mlp = cast(GatedMLP, experts[e])
            g, _, d = (getattr(mlp, n) for n in mlp.names)
            if (type(g.quant_method) is not method or getattr(g, state).data_ptr() != stacked[0][e].data_ptr()
                    or type(d.quant_method) is not method
                    or getattr(d, state).data_ptr() != stacked[1][e].data_ptr()):
                self._stacked = self._moe_kernel = None
                return None
        return stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x)
        if self.routing_weights_in_model_dtype:
            weights = weights.to(x.dtype)
        stacked = self._stack()
        if stacked is not None and self._moe_kernel is not None:
            return self._moe_kernel(x, weights, ids, *stacked).reshape(shape)
        out = torch.zeros_like(x)
        experts = self.expert_list
        for e in torch.unique(ids).tolist():
            token_idx, k_pos = torch.where(ids == e)
            h = experts[e](x[token_idx])
            h = h * weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out.reshape(shape)
