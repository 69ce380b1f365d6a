"""The AFQ linear method (mistral.rs ``mistralrs-quant/src/afq``, MLX's affine quantization).

Format, per layer of weight [out, in] with ``bits`` in {2, 3, 4, 6, 8} and group size g = 64
(groups are g consecutive weights of one row, along ``in_features``):

- ``qweight``  uint8 [out, in * bits / 8]: the codes q in [0, 2**bits - 1] as one little-endian
  bit stream per row (code j of a row at bit offset j * bits). This is byte for byte the
  ``uint32`` word array mistral.rs and MLX store (``qweight.view(torch.int32)`` gives the words
  on a little-endian machine); for 3 and 6 bits, 8 resp. 4 codes fill 3 bytes.
- ``scales``   [out, in / g] and ``biases`` [out, in / g]: 16-bit floats, the dtype of the weight
  handed over when it is float16/bfloat16 (mistral.rs stores them in the weight's dtype), bfloat16
  otherwise, so the cost is always bits + 32 / g bits per weight (afq4: 4.5).

Dequantization: ``w = q * scale + bias``. Quantization follows mistral.rs's CPU/CUDA quantizer:
per group ``scale = (max - min) / (2**bits - 1)`` (1 for a constant group), ``bias = min``,
``q = clamp(round((w - bias) / scale), 0, 2**bits - 1)``; the codes are rounded against the
scale and bias as stored (16-bit), so the stored grid is the one the weights were snapped to.
(mistral.rs's Metal kernel picks the scale so that 0 is exactly representable; the stored
format and the dequantization are the same.)

Execution: afq4 and afq8 layers are re-laid out once, as they are installed, into the affine
group layout (``quant/affine/layout.py``: the same codes, the scales and biases widened to fp32,
so 5 / 9 bits per weight at group 64) and run by the native ``qmatmul_affine`` kernels; UQFF
records and the dequantized weights come back from it exactly. afq2, afq3 and afq6 keep the
published layout and run the slower reference path: dequantize (in row blocks, so the float32
temporary stays small) and ``F.linear`` in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import QuantizedLinearMethod, chunked_reference_matmul
from mistralrs.uqff import records as R
from mistralrs_plugins.quant.affine import layout as affine

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64

# float32 elements dequantized at a time (64 MB) in the forward and while quantizing
_CHUNK_ELEMENTS = 1 << 24


def _codes_per_pack(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte pack: 2 bits 4/1, 3 bits 8/3, 4 bits 2/1, 6 bits 4/3."""
    codes = {2: 4, 3: 8, 4: 2, 6: 4, 8: 1}[bits]
    return codes, codes * bits // 8


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, n] (integers in [0, 2**bits)) -> uint8 [rows, n * bits / 8], little-endian bit stream."""
    rows, n = q.shape
    if bits == 8:
        return q.to(torch.uint8)
    codes, nbytes = _codes_per_pack(bits)
    shifts = torch.arange(codes, dtype=torch.int32, device=q.device) * bits
    word = (q.to(torch.int32).reshape(rows, n // codes, codes) << shifts).sum(-1, dtype=torch.int32)
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(nbytes)], dim=-1)
    return out.to(torch.uint8).reshape(rows, n * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, n * bits / 8] -> int32 codes [rows, n] (the inverse of `pack_codes`)."""
    rows, nb = packed.shape
    if bits == 8:
        return packed.to(torch.int32)
    codes, nbytes = _codes_per_pack(bits)
    b = packed.reshape(rows, nb // nbytes, nbytes).to(torch.int32)
    word = b[..., 0]
    for i in range(1, nbytes):
        word = word | (b[..., i] << (8 * i))
    shifts = torch.arange(codes, dtype=torch.int32, device=packed.device) * bits
    q = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(rows, nb // nbytes * codes)


def _scale_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def quantize_afq(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """weight [out, in] -> {"qweight", "scales", "biases"} (see the module docstring)."""
    out_features, in_features = weight.shape
    levels = (1 << bits) - 1
    groups = in_features // group_size
    sdt = _scale_dtype(weight)
    qweight = torch.empty(out_features, in_features * bits // 8, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, groups, dtype=sdt, device=weight.device)
    biases = torch.empty(out_features, groups, dtype=sdt, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, in_features))
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        w = weight[r0:r1].to(torch.float32).reshape(r1 - r0, groups, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        span = hi - lo
        scale = torch.where(span.abs() < 1e-12, torch.ones_like(span), span / levels).to(sdt)
        bias = lo.to(sdt)
        s, b = scale.float(), bias.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # a 16-bit scale that underflowed: all q = 0
        q = ((w - b.unsqueeze(-1)) * inv.unsqueeze(-1)).round_().clamp_(0, levels)
        qweight[r0:r1] = pack_codes(q.reshape(r1 - r0, in_features), bits)
        scales[r0:r1] = scale
        biases[r0:r1] = bias
    return {"qweight": qweight, "scales": scales, "biases": biases}


def dequantize_afq(qweight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """Rows of the three state tensors -> float32 [rows, in]."""
    rows = qweight.shape[0]
    q = unpack_codes(qweight, bits).to(torch.float32)
    groups = scales.shape[-1]
    w = q.reshape(rows, groups, group_size) * scales.float().unsqueeze(-1) + biases.float().unsqueeze(-1)
    return w.reshape(rows, groups * group_size)


class AfqLinearMethod(QuantizedLinearMethod):
    """ISQ types afq2/3/4/6/8: the published state ``qweight`` uint8 [out, in*bits/8], ``scales`` and
    ``biases`` 16-bit [out, in/64]; afq4/afq8 hold it as one affine-layout ``qweight`` (see the module
    docstring) and run the ``qmatmul_affine`` kernels, the others the reference path."""

    pairs = 0  # affine layout: (s, b) pairs per super-block; 0: the published layout
    scale_dtype = torch.bfloat16  # the published scales' dtype (UQFF records are written in it)
    _kernel: Any = None

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        name = self.qtype
        if not (name.startswith("afq") and name[3:].isdigit() and int(name[3:]) in BITS):
            raise ValueError(f"not an AFQ type: {qtype!r} (expected one of {', '.join(f'afq{b}' for b in BITS)})")
        self.bits = int(name[3:])
        self.group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"AFQ group size must be one of {GROUP_SIZES}, got {self.group_size}")

    def check_shape(self, out_features: int, in_features: int) -> str | None:
        if in_features % self.group_size:
            return f"{self.qtype} needs in_features divisible by its group size {self.group_size}, got {in_features}"
        return None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        reason = self.check_shape(*weight.shape)
        if reason:
            raise ValueError(reason)
        return quantize_afq(weight.detach(), self.bits, self.group_size)

    def set_state(self, layer: Linear, state: dict[str, torch.Tensor]) -> None:
        if self.bits in affine.BITS and "scales" in state:  # the published layout -> the affine layout
            self.scale_dtype = state["scales"].dtype
            scales, biases = state["scales"].to(torch.float32), state["biases"].to(torch.float32)
            codes = unpack_codes(state["qweight"], self.bits)
            packed, self.pairs = affine.pack(codes, scales, biases, self.bits, self.group_size)
            state = {"qweight": packed}
        super().set_state(layer, state)

    def published(self, layer: Linear, rows: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """(qweight, scales, biases) of the given rows in the published layout."""
        if not self.pairs:
            return layer.qweight[rows], layer.scales[rows], layer.biases[rows]
        codes, s, b = affine.unpack(layer.qweight[rows], layer.in_features, self.bits, self.pairs)
        groups = layer.in_features // self.group_size  # one stored pair per group (groups of 32, 64, 128)
        s, b = s[:, :groups], b[:, :groups]
        return pack_codes(codes, self.bits), s.to(self.scale_dtype), b.to(self.scale_dtype)

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        if self.pairs:
            return affine.dequantize(layer.qweight[r0:r1], layer.in_features, self.bits, self.pairs)
        return dequantize_afq(layer.qweight[r0:r1], layer.scales[r0:r1], layer.biases[r0:r1], self.bits,
                              self.group_size)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (a quantized embedding table's lookup), without the whole table."""
        idx = rows.reshape(-1)
        if self.pairs:
            w = affine.dequantize(layer.qweight[idx], layer.in_features, self.bits, self.pairs)
        else:
            w = dequantize_afq(layer.qweight[idx], layer.scales[idx], layer.biases[idx], self.bits, self.group_size)
        return w.reshape(*rows.shape, layer.in_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        if self.pairs:
            kernel = self._kernel
            if kernel is None:
                kernel = self._kernel = lookup_kernel("qmatmul_affine", layer.qweight.device)
            return kernel(x, layer.qweight, None, bits=self.bits, pairs=self.pairs, out_f32=out_f32)
        y = chunked_reference_matmul(x, layer.out_features, layer.in_features, lambda a, b: self._rows(layer, a, b))
        return y if out_f32 else y.to(x.dtype)


    # -- UQFF (family 4, mistral.rs's AfqLayer): the codes as U32 words, bits and group size as U8
    _UQFF_SUFFIXES = ("weight", "weight.bits", "weight.group_size", "weight.scales", "weight.biases")

    def uqff_entries(self, layer: Linear) -> dict[str, torch.Tensor]:
        qweight, scales, biases = self.published(layer)
        return {
            "weight": qweight.contiguous().view(torch.uint32),
            "weight.bits": R.u8(self.bits),
            "weight.group_size": R.u8(self.group_size),
            "weight.scales": scales,
            "weight.biases": biases,
        }

    @classmethod
    def uqff_qtype(cls, entries: dict[str, torch.Tensor]) -> str | None:
        R.require_exactly(entries, cls._UQFF_SUFFIXES)
        bits = R.scalar(entries, "weight.bits")
        if bits not in BITS:
            raise ValueError(f"AFQ bits {bits} is not one of {', '.join(map(str, BITS))}")
        return f"afq{bits}"

    def uqff_state(self, entries: dict[str, torch.Tensor], out_features: int,
                   in_features: int) -> dict[str, torch.Tensor]:
        group_size = R.scalar(entries, "weight.group_size")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"AFQ group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
        self.group_size = group_size
        words = R.tensor(entries, "weight")
        qweight = words.contiguous().view(torch.uint8) if words.element_size() != 1 else words
        scales, biases = R.tensor(entries, "weight.scales"), R.tensor(entries, "weight.biases")
        want = (out_features, in_features * self.bits // 8)
        groups = (out_features, in_features // group_size)
        if tuple(qweight.shape) != want or tuple(scales.shape) != groups or tuple(biases.shape) != groups:
            raise ValueError(f"an {self.qtype} record with codes {list(words.shape)} and scales {list(scales.shape)} "
                             f"given to a layer of shape [{out_features}, {in_features}]")
        return {"qweight": qweight, "scales": scales, "biases": biases}
