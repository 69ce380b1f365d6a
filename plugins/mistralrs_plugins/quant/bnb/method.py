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

Execution: 4-bit layers whose blocks lie within rows (``in % blocksize == 0``, both multiples of 16)
run the ``linear_lut4`` op on the codes as they are (the table and the fp32 absmax per block);
8-bit layers the ``linear_int8`` op (``SCB / 127`` per row). Both are native on AVX2 CPUs
(kernels/cpu_quant: the weights widened to fp32 in registers); the torch references below
dequantize blocks of output rows and multiply in float32. Other 4-bit layers take the reference
path. (The outlier decomposition of LLM.int8 is a GPU speed device and changes nothing here.)
"""

from __future__ import annotations

import json
from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod, block_scale_rows, chunked_reference_matmul


def _reference(x: torch.Tensor, n: int, rows: Any, bias: torch.Tensor | None, out_f32: bool) -> torch.Tensor:
    k = x.shape[-1]
    y = chunked_reference_matmul(x.reshape(-1, k), n, k, rows)
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = y.reshape(*x.shape[:-1], n)
    return y if out_f32 else y.to(x.dtype)


def linear_lut4(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, block: tuple[int, int] | None = None,
                out_f32: bool = False) -> torch.Tensor:
    """The torch reference of ``linear_lut4``: packed uint8 [N, K / 2] (the first code in the high nibble),
    ``W[n, k] = table[code] * scale[n // bn, k // bk]``."""
    k = x.shape[-1]

    def rows(r0: int, r1: int) -> torch.Tensor:
        b = packed[r0:r1].to(torch.int64)
        codes = torch.stack([b >> 4, b & 15], dim=-1).reshape(r1 - r0, -1)[:, :k]
        return table.to(torch.float32)[codes] * block_scale_rows(scale, block, r0, r1, k)

    return _reference(x, packed.shape[0], rows, bias, out_f32)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                block: tuple[int, int] | None = None, out_f32: bool = False) -> torch.Tensor:
    """The torch reference of ``linear_int8``: ``W[n, k] = weight[n, k] * scale[n // bn, k // bk]``."""
    k = x.shape[-1]
    return _reference(x, weight.shape[0],
                      lambda r0, r1: weight[r0:r1].to(torch.float32) * block_scale_rows(scale, block, r0, r1, k),
                      bias, out_f32)


class Bnb4bitMethod(CheckpointLinearMethod):
    """See the module docstring (4-bit)."""

    marker = "weight.quant_map"
    _kernel: Any = None

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
        n, k, bs = layer.out_features, layer.in_features, int(self.meta["blocksize"])
        if k % bs == 0 and bs % 16 == 0 and k % 16 == 0:  # every block within a row: the table kernel
            kernel = self._kernel
            if kernel is None:
                kernel = self._kernel = lookup_kernel("linear_lut4", layer.weight.device)
            return kernel(x, layer.weight.view(n, k // 2), layer.weight__quant_map, layer.weight__absmax.view(n, k // bs),
                          None, block=(1, bs), out_f32=out_f32)
        y = chunked_reference_matmul(x, layer.out_features, layer.in_features, lambda a, b: self._rows(layer, a, b))
        return y if out_f32 else y.to(x.dtype)


class Bnb8bitMethod(CheckpointLinearMethod):
    """See the module docstring (8-bit)."""

    marker = "SCB"
    _kernel: Any = None

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
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = lookup_kernel("linear_int8", layer.weight.device)
        scale = (layer.SCB.to(torch.float32) / 127.0).unsqueeze(1)  # [out, 1]: one block per row
        k16 = max(16, -(-layer.in_features // 16) * 16)
        return kernel(x, layer.weight, scale, None, block=(1, k16), out_f32=out_f32)


def BnbMethod(qtype: str, **options: Any) -> CheckpointLinearMethod:  # noqa: N802 - a class-like factory
    """The 4-bit or 8-bit method, as ``quantization_config`` says (``load_in_8bit``)."""
    qc = options.get("quant_config") or {}
    if qc.get("load_in_8bit") or (not qc.get("load_in_4bit") and "bnb_4bit_quant_type" not in qc):
        return Bnb8bitMethod(qtype, **options)
    return Bnb4bitMethod(qtype, **options)
