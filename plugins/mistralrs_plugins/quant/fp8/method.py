"""The FP8 linear methods: ``fp8`` (mistral.rs ``mistralrs-quant/src/fp8``) and ``f8q8``
(``mistralrs-quant/src/f8q8``).

``fp8`` (alias ``f8e4m3``), per layer of weight [out, in]:

- ``qweight`` uint8 [out, in]: FP8 E4M3 ("fn": max 448, no infinities) bit patterns;
  ``qweight.view(torch.float8_e4m3fn)`` is the fp8 tensor (stored as uint8 so every device can
  hold it).
- ``scale`` float32 [] : the dequantization multiplier, ``w = fp8(qweight) * scale``.

Quantization as mistral.rs's ISQ does it: one scale per tensor, ``qs = clamp(448 / absmax(W),
-448, 448)`` (so small weights are scaled by at most 448), ``qweight = e4m3(W * qs)`` (round to
nearest even), ``scale = 1 / qs``. mistral.rs multiplies in bfloat16 first; here the product is
float32, so a weight is rounded once. Cost: 8 bits per weight (+ 4 bytes per tensor).

``f8q8``, per layer (mistral.rs ``BlockF8Q8``): the weight flattened row-major, zero-padded to a
multiple of 32, and cut into blocks of 32:

- ``qweight`` uint8 [blocks, 33]: byte 0 is the block scale ``d8`` as an E4M3 bit pattern, bytes
  1..32 the int8 codes ``qs`` -- byte for byte mistral.rs's ``[BlockF8Q8]`` array (its UQFF
  ``<key>.weight``). Cost: 33 * 8 / 32 = 8.25 bits per weight.

Dequantization (as mistral.rs): ``w = qs * e4m3(d8) / 448``. Quantization: ``d = absmax / 127``
per block, as in mistral.rs, but the stored scale is rounded *up* to the next E4M3 value
(``d8 >= d * 448``) and the codes ``qs = clamp(round(w / (e4m3(d8) / 448)), -127, 127)`` are
taken against that stored scale. mistral.rs rounds ``d8`` to nearest and the codes against the
unrounded ``d``, so its weights carry the E4M3 rounding of the scale (up to 6%) as an error;
here a block's grid is the one that is stored and the error stays within half a step.

``fp8`` (and FP8 checkpoints) run the ``linear_fp8`` op: natively on x86-64 CPUs with AVX2 (the
E4M3 weights widened to fp32 in registers, kernels/cpu_quant), else its torch reference here
(dequantize blocks of output rows, ``F.linear`` in float32). ``f8q8`` is the reference path.
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import QuantizedLinearMethod, block_scale_rows, chunked_reference_matmul
from mistralrs.uqff import records as R

E4M3_MAX = 448.0
QK = 32          # f8q8 block size (mistral.rs QK8_0)
BLOCK_BYTES = 33  # 1 E4M3 scale + 32 int8 codes

_CHUNK_ELEMENTS = 1 << 24  # float32 elements dequantized at a time (64 MB)
_NATIVE_FP8 = ("cpu", "cuda")
_LUT: dict[str, torch.Tensor] = {}


def fp8_bits(x: torch.Tensor) -> torch.Tensor:
    """float -> E4M3 bit patterns (uint8), round to nearest even, saturating at +-448."""
    if x.device.type not in _NATIVE_FP8:
        return fp8_bits(x.cpu()).to(x.device)
    return x.to(torch.float32).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_values(bits: torch.Tensor) -> torch.Tensor:
    """E4M3 bit patterns (uint8) -> float32."""
    if bits.device.type in _NATIVE_FP8:
        return bits.view(torch.float8_e4m3fn).to(torch.float32)
    key = str(bits.device)
    lut = _LUT.get(key)
    if lut is None:
        lut = _LUT[key] = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(bits.device)
    return lut[bits.to(torch.int64)]


def dequantize_blocked(bits: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, r0: int = 0,
                       r1: int | None = None) -> torch.Tensor:
    """Rows r0..r1 of an E4M3 weight (uint8 bits, all rows) with block scales [ceil(N / bn), ceil(K / bk)]
    (`block` (bn, bk)) or one scale (`block` None) -> float32 [r1 - r0, K]."""
    r1 = bits.shape[0] if r1 is None else r1
    return fp8_values(bits[r0:r1]) * block_scale_rows(scale, block, r0, r1, bits.shape[1])


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               block: tuple[int, int] | None = None, out_f32: bool = False) -> torch.Tensor:
    """The torch reference of ``linear_fp8``: dequantize blocks of rows, ``F.linear`` in float32."""
    k = x.shape[-1]
    y = chunked_reference_matmul(x.reshape(-1, k), weight.shape[0], k,
                                 lambda a, b: dequantize_blocked(weight, scale, block, a, b))
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if out_f32 else y.to(x.dtype)


# ------------------------------------------------------------------------------------ fp8


def quantize_fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight [out, in] -> {"qweight": uint8 E4M3 bits [out, in], "scale": float32 []}."""
    absmax = weight.detach().abs().amax().to(torch.float32)
    qs = (E4M3_MAX / absmax).clamp(-E4M3_MAX, E4M3_MAX)  # absmax 0: inf -> 448
    out_features, in_features = weight.shape
    qweight = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, in_features))
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        qweight[r0:r1] = fp8_bits(weight[r0:r1].detach().to(torch.float32) * qs)
    return {"qweight": qweight, "scale": (1.0 / qs).reshape(())}


class Fp8LinearMethod(QuantizedLinearMethod):
    """ISQ type fp8 (f8e4m3): state ``qweight`` uint8 E4M3 bits [out, in] and ``scale`` float32 [].
    Forward: the reference path (dequantize blocks of output rows, F.linear in fp32)."""

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        if self.qtype not in ("fp8", "f8e4m3"):
            raise ValueError(f"not an FP8 type: {qtype!r}")

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return quantize_fp8(weight)

    _kernel: Any = None

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        return fp8_values(layer.qweight[r0:r1]) * layer.scale

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (a quantized embedding table's lookup), without the whole table."""
        return (fp8_values(layer.qweight[rows.reshape(-1)]) * layer.scale).reshape(*rows.shape, layer.in_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = lookup_kernel("linear_fp8", layer.qweight.device)
        return kernel(x, layer.qweight, layer.scale, None, out_f32=out_f32)


    # -- UQFF (family 3, mistral.rs's FP8Linear): the E4M3 weight, its scale three ways, and the
    # dtype code of the weight (9: F8E4M3)
    _UQFF_SUFFIXES = ("weight", "weight.dequant_w_scale", "weight.dequant_x_scale", "weight.quant_scale",
                      "weight.dtype")

    def uqff_entries(self, layer: Linear) -> dict[str, torch.Tensor]:
        scale = layer.scale.to(torch.float32).reshape(())
        return {
            "weight": layer.qweight.view(torch.float8_e4m3fn),
            "weight.dequant_w_scale": scale,
            "weight.dequant_x_scale": scale,
            "weight.quant_scale": 1.0 / scale,
            "weight.dtype": R.u32(FP8_DTYPE_CODE),
        }

    @classmethod
    def uqff_qtype(cls, entries: dict[str, torch.Tensor]) -> str | None:
        R.require_exactly(entries, cls._UQFF_SUFFIXES)
        if R.scalar(entries, "weight.dtype") != FP8_DTYPE_CODE:
            raise ValueError(f"an FP8 record of dtype code {R.scalar(entries, 'weight.dtype')}; this build reads "
                             f"F8E4M3 ({FP8_DTYPE_CODE})")
        return "fp8"

    def uqff_state(self, entries: dict[str, torch.Tensor], out_features: int,
                   in_features: int) -> dict[str, torch.Tensor]:
        weight = R.tensor(entries, "weight")
        if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"an fp8 weight {weight.dtype} {list(weight.shape)} given to a layer of shape "
                             f"[{out_features}, {in_features}]")
        scale = R.tensor(entries, "weight.dequant_w_scale")
        if scale.numel() != 1:
            raise ValueError(f"an fp8 record whose dequant_w_scale has {scale.numel()} values (expected one)")
        return {"qweight": weight.view(torch.uint8), "scale": scale.to(torch.float32).reshape(())}


FP8_DTYPE_CODE = 9  # mistral.rs utils/uqff.rs: F8E4M3


# ----------------------------------------------------------------------------------- f8q8


def _next_fp8_up(v: torch.Tensor) -> torch.Tensor:
    """Bits of the smallest E4M3 value >= v, for 0 <= v <= 448."""
    bits = fp8_bits(v)
    below = fp8_values(bits) < v
    return torch.where(below, bits + 1, bits)  # positive E4M3 patterns are ordered like their values


def quantize_f8q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [blocks, 32] -> uint8 [blocks, 33] (see the module docstring)."""
    d = x.abs().amax(-1) / 127.0
    d8 = _next_fp8_up((d * E4M3_MAX).clamp_(max=E4M3_MAX))
    dr = fp8_values(d8) / E4M3_MAX
    inv = torch.where(dr > 0, 1.0 / dr, torch.zeros_like(dr))
    qs = (x * inv.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([d8.unsqueeze(-1), qs.view(torch.uint8)], dim=-1)


def dequantize_f8q8_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [blocks, 33] -> float32 [blocks, 32]."""
    d = fp8_values(blocks[:, 0].contiguous()) / E4M3_MAX
    qs = blocks[:, 1:].contiguous().view(torch.int8).to(torch.float32)
    return qs * d.unsqueeze(-1)


def quantize_f8q8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight (any shape) -> {"qweight": uint8 [ceil(numel / 32), 33]}."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    nblocks = -(-n // QK)
    qweight = torch.empty(nblocks, BLOCK_BYTES, dtype=torch.uint8, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // QK)
    for b0 in range(0, nblocks, step):
        b1 = min(nblocks, b0 + step)
        x = flat[b0 * QK:b1 * QK].to(torch.float32)
        if x.numel() < (b1 - b0) * QK:  # the last block is zero-padded
            x = torch.cat([x, x.new_zeros((b1 - b0) * QK - x.numel())])
        qweight[b0:b1] = quantize_f8q8_blocks(x.reshape(b1 - b0, QK))
    return {"qweight": qweight}


class F8Q8LinearMethod(QuantizedLinearMethod):
    """ISQ type f8q8 (CPU): state ``qweight`` uint8 [ceil(out*in/32), 33], mistral.rs's BlockF8Q8
    bytes. Forward: the reference path (dequantize blocks of output rows, F.linear in fp32)."""

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        if self.qtype != "f8q8":
            raise ValueError(f"not the F8Q8 type: {qtype!r}")

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return quantize_f8q8(weight)

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        n_in = layer.in_features
        f0, f1 = r0 * n_in, r1 * n_in
        b0, b1 = f0 // QK, -(-f1 // QK)
        flat = dequantize_f8q8_blocks(layer.qweight[b0:b1]).reshape(-1)
        return flat[f0 - b0 * QK:f1 - b0 * QK].reshape(r1 - r0, n_in)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (a quantized embedding table's lookup), without the whole table."""
        n_in = layer.in_features
        flat = rows.reshape(-1, 1).to(torch.int64) * n_in + torch.arange(n_in, device=rows.device)
        raw = layer.qweight.reshape(-1)
        start = (flat // QK) * BLOCK_BYTES
        d = fp8_values(raw[start]) / E4M3_MAX
        w = raw[start + 1 + flat % QK].view(torch.int8).to(torch.float32) * d
        return w.reshape(*rows.shape, n_in)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        y = chunked_reference_matmul(x, layer.out_features, layer.in_features, lambda a, b: self._rows(layer, a, b))
        return y if out_f32 else y.to(x.dtype)

    # -- UQFF (family 5, mistral.rs's F8Q8Linear): the blocks' bytes, their count and the dims
    _UQFF_SUFFIXES = ("weight", "weight.num_blocks", "weight.shape")

    def uqff_entries(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {
            "weight": layer.qweight.reshape(-1),
            "weight.num_blocks": R.u32(layer.qweight.shape[0]),
            "weight.shape": R.u32_vec((layer.out_features, layer.in_features)),
        }

    @classmethod
    def uqff_qtype(cls, entries: dict[str, torch.Tensor]) -> str | None:
        R.require_exactly(entries, cls._UQFF_SUFFIXES)
        return "f8q8"

    def uqff_state(self, entries: dict[str, torch.Tensor], out_features: int,
                   in_features: int) -> dict[str, torch.Tensor]:
        R.check_shape(R.vector(entries, "weight.shape"), out_features, in_features)
        nblocks = -(-out_features * in_features // QK)
        data = R.tensor(entries, "weight")
        if R.scalar(entries, "weight.num_blocks") != nblocks or data.dtype != torch.uint8 or data.numel() != nblocks * BLOCK_BYTES:
            raise ValueError(f"an f8q8 record of {data.numel()} bytes given to a [{out_features}, {in_features}] layer "
                             f"({nblocks} blocks of {BLOCK_BYTES} bytes)")
        return {"qweight": data.reshape(nblocks, BLOCK_BYTES)}
