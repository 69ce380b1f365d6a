"""Quant-aware linear layer.

`Linear` holds a *method* object (from a quantizer plugin, or the default
`UnquantizedLinearMethod`) with the life cycle::

    method.create_weights(layer)        # register the layer's parameters (on the meta device at build time)
    <loader fills the parameters by checkpoint name: "<layer prefix>.<param name>">
    method.process_after_loading(layer) # repack / quantize for the selected kernel (ISQ quantizes here)
    method.apply(layer, x)              # the forward

A method may give a parameter a ``weight_loader(param, tensor)`` attribute to take over the
copy of a checkpoint tensor (its shape check included); otherwise the loader checks shapes and
copies with dtype conversion. Floating parameters are cast to the model dtype after the build
unless they carry ``keep_dtype = True`` (e.g. fp32 scales).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethodBase:
    """The interface every linear method implements."""

    def create_weights(self, layer: Linear) -> None:
        raise NotImplementedError

    def process_after_loading(self, layer: Linear) -> None:  # noqa: B027 - optional
        """Called once after every parameter of `layer` was filled."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class UnquantizedLinearMethod(LinearMethodBase):
    """weight [out, in] (+ bias [out]); y = x @ W.T + b."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.empty(layer.out_features), requires_grad=False)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.bfloat16 and x.device.type == "cpu":
            kernel = self._bf16_kernel or self._lookup_bf16_kernel()
            return kernel(x, layer.weight, layer.bias)
        weight, bias = cast(torch.Tensor, layer.weight), cast("torch.Tensor | None", layer.bias)
        return F.linear(x, weight, bias)

    _bf16_kernel: Any = None  # the `linear_bf16` kernel, looked up on the first bf16 CPU call

    def _lookup_bf16_kernel(self) -> Any:
        self._bf16_kernel = cpu_linear_bf16()
        return self._bf16_kernel

    def describe(self) -> str:
        return "unquantized"


def cpu_linear_bf16() -> Any:
    """The best registered `linear_bf16` kernel for CPU (the torch reference when none is registered):
    ``kernel(x, weight, bias, out_f32=False)``. Every bf16 CPU matmul goes through it: the native one
    (docs/kernels.md) is faster than F.linear for decode and gives each row the same result whatever
    else is in the batch. Callers cache it."""
    from mistralrs.nn.kernels import lookup_kernel

    return lookup_kernel("linear_bf16", "cpu")


class Linear(nn.Module):
    """y = x W^T + b through a (possibly quantized) linear method. Parameter names follow
    the method (``weight``/``bias`` when unquantized), so checkpoint names map one to one."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_method: LinearMethodBase | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.has_bias = bool(bias)
        self.quant_method: LinearMethodBase = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self)

    def set_quant_method(self, method: LinearMethodBase) -> None:
        """Swap the method before loading (the loader does this for quantizers chosen per layer):
        drops the current parameters and lets the new method create its own."""
        for name in list(self._parameters):
            del self._parameters[name]
        for name in list(self._buffers):
            del self._buffers[name]
        self.quant_method = method
        method.create_weights(self)

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"method={self.quant_method.describe()}")


def linear_layers(model: nn.Module) -> list[tuple[str, Linear]]:
    """Every `Linear` in a model with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]


def describe_methods(model: nn.Module) -> dict[str, Any]:
    """{method description: count} over a model's linear layers."""
    out: dict[str, Any] = {}
    for _, m in linear_layers(model):
        key = m.quant_method.describe()
        out[key] = out.get(key, 0) + 1
    return out
