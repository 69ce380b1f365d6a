"""The linear method of the GGML block types: ``qweight`` holds llama.cpp's block bytes."""

from __future__ import annotations

import os
from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import QuantizedLinearMethod
from mistralrs.uqff import records as R
from mistralrs_plugins.quant.ggml import GGML_TYPE_IDS, interleave
from mistralrs_plugins.quant.ggml.formats import (
    ALL_FORMATS,
    DEQUANT_ONLY_FORMATS,
    check_quantizable,
    dequantize,
    quantize,
)

# The types whose llama.cpp quantizers weight their rounding by an imatrix (q8_* ignore it).
IMPORTANCE_TYPES = frozenset({"q2k", "q3k", "q4k", "q5k", "q6k", "q4_0", "q4_1", "q5_0", "q5_1"})

# UQFF records of GGML blocks (family 0): the raw bytes, the ggml type id and the dims (mistral.rs's
# GgufMatMul). Ids 0, 1 and 30 are F32, F16 and BF16 weights stored the same way.
_UQFF_SUFFIXES = ("weight", "weight.dtype", "weight.shape")
_FLOAT_IDS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
_NAME_OF_ID = {type_id: name for name, type_id in GGML_TYPE_IDS.items()}

# Keep every layer in llama.cpp's block order even where the kernel asks for the interleaved layout (llama.cpp's
# --no-repack): the canonical tiles run instead, to compare the two on a CPU or to rule the layout out.
NO_REPACK_ENV = "MISTRALRS_NO_REPACK"


class GgmlLinearMethod(QuantizedLinearMethod):
    """State: ``qweight`` uint8 [out, in / block_size * type_size], row n = output feature n; or, where the
    device's ``qmatmul_<type>`` kernel asks for it (its ``interleave`` attribute), interleaved by that many
    rows (`interleave`: [out / 8, 8 * row bytes]; set up in `process_after_loading`, told apart by the shape).
    Whatever leaves the layer (dequantize, embedding rows, UQFF) is the canonical block bytes.

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
        if self.importance is not None and self.qtype in IMPORTANCE_TYPES:
            # llama.cpp's importance-weighted searches (the torch implementation)
            return {"qweight": quantize(self.qtype, weight, importance=self.importance.to(weight.device))}
        quantizer = self._quantizer
        if quantizer is None:
            quantizer = self._quantizer = lookup_kernel("ggml_quantize", weight.device)
        return {"qweight": quantizer(self.qtype, weight)}

    def ggml_state(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": raw}

    def process_after_loading(self, layer: Linear) -> None:
        super().process_after_loading(layer)
        qweight = layer._buffers.get("qweight")
        if qweight is None or qweight.is_meta or not interleave.can_interleave(self.qtype, layer.out_features) \
                or interleave.is_interleaved(qweight, layer.out_features) \
                or os.environ.get(NO_REPACK_ENV, "") not in ("", "0"):
            return
        rows = getattr(self._matmul_kernel(qweight), "interleave", None)
        if rows == interleave.ROWS:  # the op ggml_interleave: a native one where registered (seconds on a 7B model)
            layer._buffers["qweight"] = lookup_kernel("ggml_interleave", qweight.device)(self.qtype, qweight)

    def canonical(self, layer: Linear) -> torch.Tensor:
        """The layer's block bytes [out, row bytes] (deinterleaved, a copy, when kept interleaved)."""
        qweight = layer.qweight
        if interleave.is_interleaved(qweight, layer.out_features):
            return interleave.deinterleave(self.qtype, qweight)
        return qweight

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize(self.qtype, self.canonical(layer), layer.in_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (a quantized embedding table's lookup) without the whole table."""
        flat = rows.reshape(-1)
        qweight = layer.qweight
        if interleave.is_interleaved(qweight, layer.out_features):
            blocks = interleave.deinterleave_rows(self.qtype, qweight, flat)
        else:
            blocks = qweight[flat]
        return dequantize(self.qtype, blocks, layer.in_features).reshape(*rows.shape, layer.in_features)

    def _matmul_kernel(self, qweight: torch.Tensor) -> Any:
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = lookup_kernel(f"qmatmul_{self.qtype}", qweight.device)
        return kernel

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        return self._matmul_kernel(layer.qweight)(x, layer.qweight, None, out_f32=out_f32)

    # -- UQFF (family 0) -----------------------------------------------------------------------
    def uqff_entries(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {
            "weight": self.canonical(layer).reshape(-1),
            "weight.dtype": R.u32(GGML_TYPE_IDS[self.qtype]),
            "weight.shape": R.u32_vec((layer.out_features, layer.in_features)),
        }

    @classmethod
    def uqff_qtype(cls, entries: dict[str, torch.Tensor]) -> str | None:
        R.require_exactly(entries, _UQFF_SUFFIXES)
        type_id = R.scalar(entries, "weight.dtype")
        if type_id in _FLOAT_IDS:
            return None
        name = _NAME_OF_ID.get(type_id)
        if name is None:
            raise ValueError(f"GGML type id {type_id} is not a block type this build knows")
        return name

    @classmethod
    def uqff_float_weight(cls, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = _FLOAT_IDS[R.scalar(entries, "weight.dtype")]
        shape = R.vector(entries, "weight.shape")
        return R.tensor(entries, "weight").view(dtype).reshape(shape)

    @classmethod
    def uqff_split(cls, entries: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
        shape = R.vector(entries, "weight.shape")
        data = R.tensor(entries, "weight")
        if len(shape) != 3 or shape[0] != parts or data.numel() % parts:
            raise ValueError(f"a stacked expert record of shape {shape} does not hold {parts} experts")
        step = data.numel() // parts
        return [{"weight": data[i * step:(i + 1) * step], "weight.dtype": entries["weight.dtype"],
                 "weight.shape": R.u32_vec(shape[1:])} for i in range(parts)]

    @classmethod
    def uqff_stack(cls, records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        first = records[0]
        shape = R.vector(first, "weight.shape")
        type_id = R.scalar(first, "weight.dtype")
        if any(R.vector(r, "weight.shape") != shape or R.scalar(r, "weight.dtype") != type_id for r in records):
            return None
        return {"weight": torch.cat([r["weight"] for r in records]), "weight.dtype": R.u32(type_id),
                "weight.shape": R.u32_vec([len(records), *shape])}

    def uqff_state(self, entries: dict[str, torch.Tensor], out_features: int,
                   in_features: int) -> dict[str, torch.Tensor]:
        R.check_shape(R.vector(entries, "weight.shape"), out_features, in_features)
        fmt = self.format
        if in_features % fmt.block_size:
            raise ValueError(f"{self.qtype} rows of {in_features} are not whole blocks of {fmt.block_size}")
        row_bytes = in_features // fmt.block_size * fmt.type_size
        data = R.tensor(entries, "weight")
        if data.dtype != torch.uint8 or data.numel() != out_features * row_bytes:
            raise ValueError(f"{self.qtype} weight of {data.numel()} bytes for a [{out_features}, {in_features}] "
                             f"layer, which needs {out_features * row_bytes}")
        return {"qweight": data.reshape(out_features, row_bytes)}
