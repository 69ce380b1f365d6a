"""Feed-forward blocks: the gated MLP of Llama-like models and the plain two-layer MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)). `names` = (gate, up, down) submodule names:
    ("gate_proj", "up_proj", "down_proj") for HF Llama/Qwen, ("w1", "w3", "w2") for Mixtral experts."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


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
