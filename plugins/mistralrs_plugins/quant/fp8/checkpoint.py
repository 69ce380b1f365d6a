"""FP8 checkpoints (``quantization_config.quant_method: "fp8"``: DeepSeek-V3/Qwen3 FP8 and
transformers' fine-grained FP8), loaded as published.

Per quantized layer of weight [out, in]:

- ``weight`` F8_E4M3 [out, in];
- ``weight_scale_inv`` float32: with ``weight_block_size: [bo, bi]`` one per block,
  [ceil(out / bo), ceil(in / bi)] (blocks at the edges are partial); without it, one per tensor;
- ``activation_scale`` (``activation_scheme: "static"``) is read and ignored: activations stay
  in the model dtype here.

Dequantized: ``W[o, i] = e4m3(weight[o, i]) * weight_scale_inv[o // bo, i // bi]``. Layers
listed in ``modules_to_not_convert`` are published in float and stay float. Execution: the
``linear_fp8`` op with the block scales (native on AVX2 CPUs; method.py).
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod
from mistralrs_plugins.quant.fp8.method import dequantize_blocked


class Fp8CheckpointMethod(CheckpointLinearMethod):
    """See the module docstring."""

    marker = "weight_scale_inv"
    _kernel: Any = None

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        block = self.quant_config.get("weight_block_size")
        if block is not None and (not isinstance(block, (list, tuple)) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"weight_block_size {block!r} is not two positive integers")
        self.block = tuple(block) if block is not None else None
        fmt = str(self.quant_config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"FP8 format {fmt!r} is not supported (this build reads e4m3)")

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.block is None:
            scale: tuple[int, ...] = ()
        else:
            scale = (-(-out_features // self.block[0]), -(-in_features // self.block[1]))
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "weight": ((out_features, in_features), torch.float8_e4m3fn),
            "weight_scale_inv": (scale, torch.float32),
        }
        if "activation_scale" in self.present:
            specs["activation_scale"] = ((), torch.float32)
        return specs

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        if self.block is None and layer.weight_scale_inv.numel() != 1:
            raise ValueError("a per-tensor FP8 layer with several scales; set weight_block_size in quantization_config")
        return {"weight": layer.weight, "weight_scale_inv": layer.weight_scale_inv}  # activation_scale dropped

    def describe(self) -> str:
        return f"fp8 {'x'.join(map(str, self.block))} blocks" if self.block else "fp8 per tensor"

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        return dequantize_blocked(layer.weight.view(torch.uint8), layer.weight_scale_inv, self.block, r0, r1)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        idx = rows.reshape(-1)
        return torch.cat([self._rows(layer, int(r), int(r) + 1) for r in idx]).reshape(*rows.shape, layer.in_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = lookup_kernel("linear_fp8", layer.weight.device)
        return kernel(x, layer.weight.view(torch.uint8), layer.weight_scale_inv, None, block=self.block,
                      out_f32=out_f32)
