"""The HQQ linear method (mistral.rs ``mistralrs-quant/src/hqq``, after mobiusml/hqq).

mistral.rs's ISQ configuration: bits 4 or 8, group size g = 64, axis 0, channel-wise, zeros not
rounded, 10 optimizer steps (``ISQ_HQQ_DEFAULT_OPT_STEPS``; 20 is the optimizer's own default).
The weight [out, in] is flattened and viewed as ``V = W.reshape(g, M)`` with M = out*in/g: a
group is one column of V, i.e. the g weights ``flat[j], flat[j + M], flat[j + 2M], ...``
(for ``out % g == 0``: one input column, every out/g-th row).

Stored, for M = out*in/g:

- ``qweight`` uint8: hqq8 [g, M], the codes of V; hqq4 [g/2, M], row i = ``code[i] << 4 |
  code[i + g/2]`` (mistral.rs's CPU bit-packing: first half of the rows in the high nibble).
- ``scales`` float32 [1, M]: the dequantization multiplier per group (1 / the quantizer's scale).
- ``zeros``  float32 [1, M]: the zero point per group, in code units.

Dequantization: ``V = (q - zeros) * scales``, then reshaped to [out, in]. Cost per weight:
bits + 64/g (hqq4: 5, hqq8: 9); mistral.rs keeps scales and zeros in float32.

HQQ checkpoints (``checkpoint.py``) may also group along axis 1 (hqq's and transformers'
default): ``V = W.reshape(M, g)``, a group is g consecutive weights of a row, ``scales`` and
``zeros`` are [M, 1] and the codes are packed along V's rows in the same way (`PACKINGS`: 1, 2,
3, 4 and 8-bit packings; hqq's 5 and 6 bits are one code per byte).

Quantization: per group ``scale = (2**bits - 1) / (max - min)`` (clamped to [0, 2e4]),
``zero = -min * scale``; then ``optimize_weights_proximal_legacy`` refines the zero:
repeat ``iters`` times: ``Wq = clamp(round(W*scale + zero), 0, 2**bits-1)``, ``Wr = (Wq -
zero) / scale``, ``We = shrink_lp(W - Wr, beta, p)``, ``zero = mean_g(Wq - (W - We) * scale)``,
``beta *= kappa``; stop as soon as the mean |W - Wr| does not improve. The codes are the last
rounding with the final zero. The optimizer runs over column blocks of V (each group is
independent; the stopping rule sums the error over all blocks), so the float32 temporaries stay
small whatever the layer size.

Execution is the slower reference path: dequantize (in blocks of output rows) and ``F.linear``
in float32. Nothing dequantized is kept between calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import QuantizedLinearMethod
from mistralrs.uqff import records as R

BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64        # mistral.rs ISQ_HQQ_GROUP_SIZE
ISQ_OPTIMIZATION_STEPS = 10    # mistral.rs ISQ_HQQ_DEFAULT_OPT_STEPS
LP_NORM, BETA, KAPPA = 0.7, 10.0, 1.01  # mistral.rs OptParams::default

_CHUNK_ELEMENTS = 1 << 17  # float32 elements per block while quantizing (512 KB: stays in cache)
_MATMUL_CHUNK_ELEMENTS = 1 << 24  # float32 elements dequantized at a time in the forward (64 MB)


def _shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """HQQ's generalized soft-thresholding: sign(x) * relu(|x| - |x|**(p-1) / beta)."""
    ax = x.abs()
    if lp_norm == 1.0:
        return (ax - 1.0 / beta).relu_().mul_(x.sign())
    return (ax - ax.pow(lp_norm - 1.0).div_(beta)).relu_().mul_(x.sign())  # |x| = 0: -inf, cut by relu


def _column_blocks(m: int, group_size: int):
    step = max(1, _CHUNK_ELEMENTS // group_size)
    for c0 in range(0, m, step):
        yield c0, min(m, c0 + step)


def quantize_hqq(weight: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                 optimization_steps: int = ISQ_OPTIMIZATION_STEPS, lp_norm: float = LP_NORM,
                 beta: float = BETA, kappa: float = KAPPA) -> dict[str, torch.Tensor]:
    """weight [out, in] -> {"qweight", "scales", "zeros"} (see the module docstring)."""
    n = weight.numel()
    if n % group_size:
        raise ValueError(f"HQQ needs the number of weights ({n}) divisible by the group size {group_size}")
    m = n // group_size
    device = weight.device
    view = weight.detach().reshape(group_size, m)
    max_v = float(round(2.0 ** bits - 1))
    scale = torch.empty(1, m, dtype=torch.float32, device=device)
    zero = torch.empty(1, m, dtype=torch.float32, device=device)

    for c0, c1 in _column_blocks(m, group_size):
        w = view[:, c0:c1].to(torch.float32)
        lo, hi = w.amin(0, keepdim=True), w.amax(0, keepdim=True)
        s = (max_v / (hi - lo)).clamp_(0.0, 2e4)  # the inverse scale: W * s + z is in code units
        scale[:, c0:c1] = s
        zero[:, c0:c1] = -lo * s

    # mean_g(Wq - (W - We) * scale) = mean_g(Wq) - scale * (mean_g(W) - mean_g(We)): scale is per group
    w_mean = torch.empty(1, m, dtype=torch.float32, device=device)
    for c0, c1 in _column_blocks(m, group_size):
        w_mean[:, c0:c1] = view[:, c0:c1].to(torch.float32).mean(0, keepdim=True)
    best = 1e4
    for _ in range(optimization_steps):
        err = 0.0
        for c0, c1 in _column_blocks(m, group_size):
            w = view[:, c0:c1].to(torch.float32)
            s, z = scale[:, c0:c1], zero[:, c0:c1]
            wq = torch.addcmul(z, w, s).round_().clamp_(0.0, max_v)
            diff = (wq - z).div_(s)                      # Wr
            torch.sub(w, diff, out=diff)                 # W - Wr
            err += float(diff.abs().sum(dtype=torch.float64))
            we = _shrink_lp(diff, beta, lp_norm)
            zero[:, c0:c1] = wq.mean(0, keepdim=True) - s * (w_mean[:, c0:c1] - we.mean(0, keepdim=True))
        beta *= kappa
        err /= n
        if err < best:
            best = err
        else:
            break

    rows = group_size if bits == 8 else group_size // 2
    qweight = torch.empty(rows, m, dtype=torch.uint8, device=device)
    for c0, c1 in _column_blocks(m, group_size):
        w = view[:, c0:c1].to(torch.float32)
        q = (w * scale[:, c0:c1] + zero[:, c0:c1]).round_().clamp_(0.0, max_v).to(torch.uint8)
        qweight[:, c0:c1] = q if bits == 8 else (q[:rows] << 4) | q[rows:]
    return {"qweight": qweight, "scales": 1.0 / scale, "zeros": zero}


# HQQ's bit packings (hqq ``BitPack``): name -> (codes per stored element, bits per code). The
# weight's view V [R, C] is packed along its rows: stored row r holds V rows r, r + S, r + 2S, ...
# (S = stored rows), the first in the highest bits; "3bit_32" packs ten 3-bit codes in an int32
# (bits 29..0) and pads R up to a multiple of ten with zero rows. hqq stores 5 and 6 bits one
# code per byte ("8bit_u8").
PACKINGS: dict[str, tuple[int, int]] = {
    "8bit_u8": (1, 8), "4bit_u8": (2, 4), "2bit_u8": (4, 2), "1bit_u8": (8, 1), "3bit_32": (10, 3),
}
PACKING_OF_BITS: dict[int, str] = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32",
                                   2: "2bit_u8", 1: "1bit_u8"}


def _codes_of_view_rows(qweight: torch.Tensor, packing: str, k0: int, k1: int) -> torch.Tensor:
    """Codes of rows k0..k1 of V (int32 [k1-k0, C])."""
    per, width = PACKINGS[packing]
    if per == 1:
        return qweight[k0:k1].to(torch.int32)
    step = qweight.shape[0]
    k = torch.arange(k0, k1, device=qweight.device)
    src = qweight[k % step].to(torch.int32)
    shift = (width * (per - 1 - k // step)).to(torch.int32).unsqueeze(-1)
    return (src >> shift) & ((1 << width) - 1)


def dequantize_flat(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    f0: int, f1: int, *, axis: int = 0, packing: str | None = None) -> torch.Tensor:
    """Flat weights f0..f1 (row-major over [out, in]) -> float32 [f1 - f0]. V = the flat weight as
    [R, C] (axis 0: [group_size, M], one group per column, scales/zeros [1, M]; axis 1:
    [M, group_size], one group per row, scales/zeros [M, 1])."""
    m = qweight.shape[1]  # C: every packing keeps V's columns
    k0, k1 = f0 // m, -(-f1 // m)
    q = _codes_of_view_rows(qweight, packing or PACKING_OF_BITS[bits], k0, k1).to(torch.float32)
    if axis == 1:
        scales, zeros = scales[k0:k1], zeros[k0:k1]
    v = (q - zeros) * scales
    return v.reshape(-1)[f0 - k0 * m:f1 - k0 * m]


def dequantize_at(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  flat_index: torch.Tensor, *, axis: int = 0, packing: str | None = None) -> torch.Tensor:
    """The weights at the given flat indices (any shape) -> float32 of that shape."""
    per, width = PACKINGS[packing or PACKING_OF_BITS[bits]]
    m = qweight.shape[1]
    k, j = flat_index // m, flat_index % m
    if per == 1:
        q = qweight[k, j].to(torch.int32)
    else:
        step = qweight.shape[0]
        q = (qweight[k % step, j].to(torch.int32) >> (width * (per - 1 - k // step)).to(torch.int32)) & ((1 << width) - 1)
    g = (k, 0) if axis == 1 else (0, j)
    return (q.to(torch.float32) - zeros[g]) * scales[g]


class HqqLinearMethod(QuantizedLinearMethod):
    """ISQ types hqq4/hqq8: state ``qweight`` uint8, ``scales``/``zeros`` float32 [1, out*in/64].
    Forward: the reference path (dequantize blocks of output rows, F.linear in fp32)."""

    supported_bits: tuple[int, ...] = BITS

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        name = self.qtype
        if not (name.startswith("hqq") and name[3:].isdigit() and int(name[3:]) in self.supported_bits):
            raise ValueError(f"not an HQQ type: {qtype!r} (expected "
                             f"{' or '.join(f'hqq{b}' for b in self.supported_bits)})")
        self.bits = int(name[3:])
        self.group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"HQQ group size must be even, got {self.group_size}")
        self.optimization_steps = int(options.get("optimization_steps", ISQ_OPTIMIZATION_STEPS))
        self.axis = 0  # ISQ groups along axis 0; a checkpoint (or UQFF record) may group along axis 1
        self.packing = PACKING_OF_BITS[self.bits]

    def check_shape(self, out_features: int, in_features: int) -> str | None:
        n = out_features * in_features
        if n % self.group_size:
            return (f"{self.qtype} needs out*in divisible by its group size {self.group_size}, "
                    f"got {out_features}x{in_features}")
        return None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        reason = self.check_shape(*weight.shape)
        if reason:
            raise ValueError(reason)
        return quantize_hqq(weight, self.bits, self.group_size, self.optimization_steps)

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        n_in = layer.in_features
        flat = dequantize_flat(layer.qweight, layer.scales, layer.zeros, self.bits, r0 * n_in, r1 * n_in,
                               axis=self.axis, packing=self.packing)
        return flat.reshape(r1 - r0, n_in)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return self._rows(layer, 0, layer.out_features)

    def dequantize_rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (a quantized embedding table's lookup), without the whole table."""
        n_in = layer.in_features
        cols = torch.arange(n_in, device=rows.device)
        flat = rows.reshape(-1, 1).to(torch.int64) * n_in + cols
        w = dequantize_at(layer.qweight, layer.scales, layer.zeros, self.bits, flat, axis=self.axis,
                          packing=self.packing)
        return w.reshape(*rows.shape, n_in)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        xf = x.to(torch.float32)
        n_out, n_in = layer.out_features, layer.in_features
        step = max(1, _MATMUL_CHUNK_ELEMENTS // max(1, n_in))
        if n_out <= step:
            y = F.linear(xf, self._rows(layer, 0, n_out))
        else:
            y = torch.empty(x.shape[0], n_out, dtype=torch.float32, device=x.device)
            for r0 in range(0, n_out, step):
                r1 = min(n_out, r0 + step)
                y[:, r0:r1] = F.linear(xf, self._rows(layer, r0, r1))
        return y if out_f32 else y.to(x.dtype)

    # -- UQFF (family 2, mistral.rs's HqqLayer): axis 0, channel-wise, zeros not rounded --------
    _UQFF_SUFFIXES = ("weight", "weight.scales", "weight.zeros", "weight.shape", "weight.bits", "weight.group_size",
                      "weight.axis", "weight.optimization_steps", "weight.round_zeros", "weight.channel_wise")

    def uqff_entries(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {
            "weight": layer.qweight,
            "weight.scales": layer.scales,
            "weight.zeros": layer.zeros,
            "weight.shape": R.u32_vec((layer.out_features, layer.in_features)),
            "weight.bits": R.u8(self.bits),
            "weight.group_size": R.u32(self.group_size),
            "weight.axis": R.u8(self.axis),
            "weight.optimization_steps": R.u32(self.optimization_steps),
            "weight.round_zeros": R.u8(0),
            "weight.channel_wise": R.u8(1),
        }

    @classmethod
    def uqff_qtype(cls, entries: dict[str, torch.Tensor]) -> str | None:
        R.require_exactly(entries, cls._UQFF_SUFFIXES)
        bits = R.scalar(entries, "weight.bits")
        if bits not in BITS:
            raise ValueError(f"HQQ bits {bits}: this build reads {' and '.join(map(str, BITS))}-bit HQQ")
        return f"hqq{bits}"

    def uqff_state(self, entries: dict[str, torch.Tensor], out_features: int,
                   in_features: int) -> dict[str, torch.Tensor]:
        R.check_shape(R.vector(entries, "weight.shape"), out_features, in_features)
        axis = R.scalar(entries, "weight.axis")
        if axis not in (0, 1) or R.scalar(entries, "weight.channel_wise") != 1:
            raise ValueError("an HQQ record with an axis other than 0 or 1, or not channel-wise; this build reads "
                             "channel-wise HQQ grouped along axis 0 or 1")
        group_size = R.scalar(entries, "weight.group_size")
        if group_size < 2 or group_size % 2 or (out_features * in_features) % group_size:
            raise ValueError(f"HQQ group size {group_size} does not divide a [{out_features}, {in_features}] weight")
        self.group_size = group_size
        self.optimization_steps = R.scalar(entries, "weight.optimization_steps")
        self.axis = axis
        m = out_features * in_features // group_size
        view_rows = group_size if axis == 0 else m
        rows, cols = (view_rows if self.bits == 8 else view_rows // 2), (m if axis == 0 else group_size)
        qweight = R.tensor(entries, "weight")
        scales, zeros = R.tensor(entries, "weight.scales"), R.tensor(entries, "weight.zeros")
        if (qweight.dtype != torch.uint8 or tuple(qweight.shape) != (rows, cols)
                or scales.numel() != m or zeros.numel() != m):
            raise ValueError(f"an {self.qtype} record with codes {list(qweight.shape)} given to a layer of shape "
                             f"[{out_features}, {in_features}] (expected [{rows}, {cols}])")
        groups = (1, m) if axis == 0 else (m, 1)
        return {"qweight": qweight, "scales": scales.float().reshape(groups), "zeros": zeros.float().reshape(groups)}
