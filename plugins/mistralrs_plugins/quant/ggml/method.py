"""The linear method of the GGML block types: ``qweight`` holds llama.cpp's block bytes."""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import QuantizedLinearMethod
from mistralrs_plugins.quant.ggml.formats import ALL_FORMATS, DEQUANT_ONLY_FORMATS, check_quantizable, dequantize


class GgmlLinearMethod(QuantizedLinearMethod):
    """State: ``qweight`` uint8 [out, in / block_size * type_size], row n = output feature n.

    The dequantize-only types (`formats.DEQUANT_ONLY_FORMATS`: i-quants, TQ1_0/TQ2_0, MXFP4) take
    their blocks from a GGUF file (`load_ggml`) and refuse `quantize`."""

    rows_state = True

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        if self.qtype not in ALL_FORMATS:
            raise ValueError(f"not a GGML block type: {qtype!r}")
        self.format = ALL_FORMATS[self.qtype]
        self.dequantize_only = self.qtype in DEQUANT_ONLY_FORMATS
        self._kernel: Any = None
        self._quantizer: Any = None

    def check_shape(self, out_features: int, in_features: int) -> str | None:
        bs = self.format.block_size
        if in_features % bs:
            return f"{self.qtype} needs in_features divisible by {bs}, got {in_features}"
        return None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        # The op ggml_quantize: a native quantizer where one is registered (the cpu_ggml_quantize plugin),
        # else the torch reference (formats.quantize); llama.cpp's block bytes either way.
        check_quantizable(self.qtype)  # a dequantize-only type: a ValueError naming it
        quantizer = self._quantizer
        if quantizer is None:
            quantizer = self._quantizer = lookup_kernel("ggml_quantize", weight.device)
        return {"qweight": quantizer(self.qtype, weight)}

    def ggml_state(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": raw}

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize(self.qtype, layer.qweight, layer.in_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (a quantized embedding table's lookup) without the whole table."""
        return dequantize(self.qtype, layer.qweight[rows.reshape(-1)], layer.in_features).reshape(
            *rows.shape, layer.in_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = lookup_kernel(f"qmatmul_{self.qtype}", layer.qweight.device)
        return kernel(x, layer.qweight, None, out_f32=out_f32)
