"""bitsandbytes checkpoints (``quantization_config.quant_method: "bitsandbytes"``), loaded as
published, as transformers serializes them.

4-bit (``load_in_4bit``, ``bnb_4bit_quant_type`` nf4 or fp4), per layer of weight [out, in]:

- ``weight`` uint8 [out * in / 2, 1]: the flattened weight's 4-bit codes, two per byte, the
  first in the high nibble;
- ``weight.quant_map`` float32 [16]: the value of each code (the NF4 or FP4 table);
- ``weight.absmax``: the scale of each block of ``blocksize`` elements of the flattened weight;
  float32, or with nested ("double") quantization uint8 codes of ``weight.nested_quant_map``
  (float32 [256]) times ``weight.nested_absmax`` (float32, one per 256 blocks), plus
  ``nested_offset``;
- ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object with
  quant_type, blocksize, dtype, shape and the nested settings.

Dequantized: ``W.flat[j] = quant_map[code[j]] * absmax[j // blocksize]``.

8-bit (``load_in_8bit``, LLM.int8): ``weight`` int8 [out, in] and ``SCB`` float32 [out]:
``W[o, i] = weight[o, i] * SCB[o] / 127``.

Execution is the reference path (dequantize blocks of output rows, matmul in float32; the
outlier decomposition of LLM.int8 is a GPU speed device and changes nothing here).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod, chunked_reference_matmul


class Bnb4bitMethod(CheckpointLinearMethod):
    """See the module docstring (4-bit)."""

    marker = "weight.quant_map"

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        kind = str(self.quant_config.get("bnb_4bit_quant_type", "fp4")).lower()
        if kind not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type {kind!r} is not nf4 or fp4")
        self.kind = kind
        self.meta: dict[str, Any] = {}

    def _state_key(self) -> str:
        for name in self.present:
            if name.startswith("weight.quant_state.bitsandbytes__"):
                return name
        return f"weight.quant_state.bitsandbytes__{self.kind}"

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        n = out_features * in_features
        nested = "weight.nested_absmax" in self.present
        # the block counts follow the blocksize in the quant_state tensor: taken as they come, checked in convert()
        specs: dict[str, tuple[tuple[int, ...] | None, torch.dtype]] = {
            "weight": ((-(-n // 2), 1), torch.uint8),
            "weight__quant_map": ((16,), torch.float32),
            "weight__absmax": (None, torch.uint8 if nested else torch.float32),
        }
        if nested:
            specs["weight__nested_absmax"] = (None, torch.float32)
            specs["weight__nested_quant_map"] = ((256,), torch.float32)
        specs[self._state_key().replace(".", "__")] = (None, torch.uint8)
        return specs

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        state_name = self._state_key().replace(".", "__")
        meta = json.loads(bytes(getattr(layer, state_name).tolist()).decode("utf-8"))
        self.meta = meta
        shape = [int(d) for d in meta.get("shape", [])]
        if shape != [layer.out_features, layer.in_features]:
            raise ValueError(f"the quant_state says shape {shape}, the layer is [{layer.out_features}, {layer.in_features}]")
        if str(meta.get("quant_type", self.kind)) != self.kind:
            self.kind = str(meta["quant_type"])
        blocksize = int(meta["blocksize"])
        n = layer.out_features * layer.in_features
        absmax = layer.weight__absmax
        if absmax.numel() != -(-n // blocksize):
            raise ValueError(f"weight.absmax has {absmax.numel()} values for {-(-n // blocksize)} blocks of {blocksize}")
        if hasattr(layer, "weight__nested_absmax"):
            nested_bs = int(meta.get("nested_blocksize", 256))
            codes = layer.weight__nested_quant_map[absmax.to(torch.int64)]
            scale = layer.weight__nested_absmax.repeat_interleave(nested_bs)[: absmax.numel()]
            absmax = codes * scale + float(meta.get("nested_offset", 0.0))
        return {"weight": layer.weight, "weight__quant_map": layer.weight__quant_map,
                "weight__absmax": absmax.to(torch.float32)}

    def describe(self) -> str:
        return f"bnb {self.kind}"

    def _flat(self, layer: Linear, start: int, stop: int) -> torch.Tensor:
        """Elements start..stop of the flattened weight, float32."""
        packed = layer.weight.reshape(-1)
        b0, b1 = start // 2, -(-stop // 2)
        pairs = packed[b0:b1].to(torch.int64)
        codes = torch.stack([pairs >> 4, pairs & 15], dim=-1).reshape(-1)[start - 2 * b0:stop - 2 * b0]
        blocks = torch.arange(start, stop, device=packed.device) // int(self.meta["blocksize"])
        return layer.weight__quant_map[codes] * layer.weight__absmax[blocks]

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        n_in = layer.in_features
        start, stop = r0 * n_in, r1 * n_in
        bs = int(self.meta["blocksize"])
        if start % bs == 0 and stop % bs == 0:  # whole blocks: a table lookup and one broadcast multiply
            pairs = layer.weight.reshape(-1)[start // 2:stop // 2]
            codes = torch.stack([pairs >> 4, pairs & 15], dim=-1).reshape(-1, bs).to(torch.int32)
            values = layer.weight__quant_map[codes] * layer.weight__absmax[start // bs:stop // bs].unsqueeze(1)
            return values.reshape(r1 - r0, n_in)
        return self._flat(layer, start, stop).reshape(r1 - r0, n_in)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        y = chunked_reference_matmul(x, layer.out_features, layer.in_features, lambda a, b: self._rows(layer, a, b))
        return y if out_f32 else y.to(x.dtype)


class Bnb8bitMethod(CheckpointLinearMethod):
    """See the module docstring (8-bit)."""

    marker = "SCB"

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        specs: dict[str, tuple[tuple[int, ...] | None, torch.dtype]] = {
            "weight": ((out_features, in_features), torch.int8),
            "SCB": ((out_features,), torch.float32),
        }
        if "weight_format" in self.present:
            specs["weight_format"] = (None, torch.uint8)
        return specs

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        return {"weight": layer.weight, "SCB": layer.SCB}

    def describe(self) -> str:
        return "bnb int8"

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        return layer.weight[r0:r1].to(torch.float32) * (layer.SCB[r0:r1].to(torch.float32) / 127.0).unsqueeze(1)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        y = chunked_reference_matmul(x, layer.out_features, layer.in_features, lambda a, b: self._rows(layer, a, b))
        return y if out_f32 else y.to(x.dtype)


def BnbMethod(qtype: str, **options: Any) -> CheckpointLinearMethod:  # noqa: N802 - a class-like factory
    """The 4-bit or 8-bit method, as ``quantization_config`` says (``load_in_8bit``)."""
    qc = options.get("quant_config") or {}
    if qc.get("load_in_8bit") or (not qc.get("load_in_4bit") and "bnb_4bit_quant_type" not in qc):
        return Bnb8bitMethod(qtype, **options)
    return Bnb4bitMethod(qtype, **options)
