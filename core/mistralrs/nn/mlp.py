"""Feed-forward blocks: the gated MLP of Llama-like models and the plain two-layer MLP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear, UnquantizedLinearMethod


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)). `names` = (gate, up, down) submodule names:
    ("gate_proj", "up_proj", "down_proj") for HF Llama/Qwen, ("w1", "w3", "w2") for Mixtral experts.

    Once materialised (`after_materialize`), plain weights of gate and up share one [2I, H] tensor:
    they stay parameters under their own names (views into it, so loading is unchanged) while the
    forward runs one matmul and a fused activation-and-multiply kernel (``silu_and_mul``)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        *,
        bias: bool = False,
        names: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        self.names = tuple(names)
        gate, up, down = self.names
        setattr(self, gate, Linear(hidden_size, intermediate_size, bias=bias))
        setattr(self, up, Linear(hidden_size, intermediate_size, bias=bias))
        setattr(self, down, Linear(intermediate_size, hidden_size, bias=bias))
        self.act_fn = get_activation(hidden_act)
        self._gate_up: Linear | None = None  # not a submodule: its parameters are gate's and up's
        self._act_and_mul: Callable[[torch.Tensor], torch.Tensor] | None = None

    def after_materialize(self) -> None:
        """Re-lay out gate's and up's (empty) weights as halves of one tensor; plain weights only."""
        gate, up, _ = (getattr(self, n) for n in self.names)
        plain = all(type(m.quant_method) is UnquantizedLinearMethod for m in (gate, up))
        if not plain or gate.weight.shape != up.weight.shape or gate.weight.dtype != up.weight.dtype:
            return
        if gate.weight.is_meta or (gate.bias is None) != (up.bias is None):
            return
        inter, hidden = gate.weight.shape
        with torch.device("meta"):
            fused = Linear(hidden, 2 * inter, bias=gate.bias is not None)
        for name in ("weight", "bias"):
            halves = getattr(gate, name), getattr(up, name)
            if halves[0] is None:
                continue
            whole = nn.Parameter(torch.empty((2 * inter, *halves[0].shape[1:]), dtype=halves[0].dtype,
                                             device=halves[0].device), requires_grad=False)
            setattr(fused, name, whole)
            for module, old, part in ((gate, halves[0], whole[:inter]), (up, halves[1], whole[inter:])):
                view = nn.Parameter(part, requires_grad=False)
                view.__dict__.update(old.__dict__)  # keep loader attributes
                setattr(module, name, view)
        from mistralrs.nn.kernels import lookup_kernel

        if self.act_fn is F.silu:
            act_and_mul = lookup_kernel("silu_and_mul", gate.weight.device)
        else:
            act = self.act_fn

            def act_and_mul(gu: torch.Tensor) -> torch.Tensor:
                g, u = gu.chunk(2, dim=-1)
                return act(g) * u

        object.__setattr__(self, "_gate_up", fused)  # not registered: no new state_dict names
        self._act_and_mul = act_and_mul

    def after_loading(self) -> None:
        """Quantized gate and up of one type become one matmul (their states are views of the
        fused layer's); the plain-weight fusion happens at materialisation instead (and ends when
        either weight is replaced, e.g. re-quantized)."""
        from mistralrs.nn.quantized import fuse_rows, still_fused

        gate, up = getattr(self, self.names[0]), getattr(self, self.names[1])
        if self._fused() is not None or still_fused(self._gate_up_q, [gate, up]):
            return  # already fused (`SparseMoE` fuses its GGML experts before stacking them)
        fused = fuse_rows([gate, up])
        if fused is None:
            return
        object.__setattr__(self, "_gate_up_q", fused)
        if self.act_fn is F.silu:
            from mistralrs.nn.kernels import lookup_kernel

            self._act_and_mul = lookup_kernel("silu_and_mul", next(iter(fused.buffers())).device)
        else:
            act = self.act_fn

            def act_and_mul(gu: torch.Tensor) -> torch.Tensor:
                g, u = gu.chunk(2, dim=-1)
                return act(g) * u

            self._act_and_mul = act_and_mul

    _gate_up_q: Linear | None = None  # quantized gate+up fused after loading (not a submodule)

    def _fused(self) -> Linear | None:
        """The fused gate/up layer while gate and up still are its halves (a quantizer or a caller
        replacing either weight ends the fusion)."""
        fused = self._gate_up
        if fused is None:
            return None
        gate, up = getattr(self, self.names[0]), getattr(self, self.names[1])
        if (
            type(gate.quant_method) is not UnquantizedLinearMethod
            or type(up.quant_method) is not UnquantizedLinearMethod
            or not _halves_of(cast(torch.Tensor, fused.weight), cast(torch.Tensor, gate.weight),
                              cast(torch.Tensor, up.weight))
        ):
            self._gate_up = self._act_and_mul = None
            return None
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        fused = self._fused()
        if fused is not None and self._act_and_mul is not None:
            return down(self._act_and_mul(fused(x)))
        quantized = self._gate_up_q
        if quantized is not None and self._act_and_mul is not None:
            from mistralrs.nn.quantized import still_fused

            if still_fused(quantized, [gate, up]):
                return down(self._act_and_mul(quantized(x)))
            self._gate_up_q = None
        return down(self.act_fn(gate(x)) * up(x))


def _halves_of(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == w.data_ptr() and b.data_ptr() == w.data_ptr() + a.numel() * w.element_size()


class MLP(nn.Module):
    """fc2(act(fc1(x))). `names` = (in, out): ("fc1", "fc2") (Phi, CLIP) or ("c_fc", "c_proj") (GPT-2 style)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "gelu",
        *,
        bias: bool = True,
        names: Sequence[str] = ("fc1", "fc2"),
    ) -> None:
        super().__init__()
        self.names = tuple(names)
        fc_in, fc_out = self.names
        setattr(self, fc_in, Linear(hidden_size, intermediate_size, bias=bias))
        setattr(self, fc_out, Linear(intermediate_size, hidden_size, bias=bias))
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc_in, fc_out = (getattr(self, n) for n in self.names)
        return fc_out(self.act_fn(fc_in(x)))
