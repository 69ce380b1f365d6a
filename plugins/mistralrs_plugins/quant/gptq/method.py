"""GPTQ checkpoints (AutoGPTQ / GPTQModel ``quant_method: "gptq"``), loaded as published.

Per quantized layer of weight [out, in], with ``bits`` b in {2, 4, 8}, ``group_size`` g (-1: one
group over the whole input), n = 32 / b codes per int32 (least significant first):

- ``qweight`` int32 [in / n, out]: codes packed along the input dim (row i*n + k of the codes is
  bits k*b .. k*b+b-1 of row i);
- ``qzeros``  int32 [G, out / n]: zero points, packed along the output dim; in the original
  ``checkpoint_format: "gptq"`` (v1) stored minus one, in ``"gptq_v2"`` as they are;
- ``scales``  float16 [G, out];
- ``g_idx``   int32 [in] (optional): the group of each input column (``desc_act`` checkpoints
  permute it); without it column i is in group i // g.

Dequantized: ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])``.

Execution: a layer whose zero points are all 2**(b-1) (symmetric), with b = 4 or 8, columns in
order (``g_idx[i] == i // g``) and g a multiple of 32 (or -1 with in % 32 == 0) *is* a GGML
block layer: q4_0 blocks are ``d * (q - 8)`` with an fp16 d per 32, q8_0 ``d * q8``, so every
block of 32 gets its group's fp16 scale and the codes as they are -- the same weights bit for bit,
run by the ``qmatmul_q4_0`` / ``qmatmul_q8_0`` kernels. Other 4- and 8-bit layers with columns in
order and groups of 32, 64 or a multiple of 128 (asymmetric zero points) are affine groups
``w = s * q + b`` with b = -s * zero, exact in fp32: they are re-laid out once
(``quant/affine/layout.py``) and run by the ``qmatmul_affine`` kernels. Any other layer
(``desc_act`` order, 2 bits, other groups) keeps its tensors and runs the slower reference path
(dequantize blocks of output rows, matmul in float32); nothing is re-quantized.
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.kernels import lookup_kernel
from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod, chunked_reference_matmul
from mistralrs_plugins.quant.affine import layout as affine

BITS = (2, 4, 8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] with 32/bits codes per int32 along dim 0 -> int32 [R * 32/bits, C]."""
    n = 32 // bits
    shifts = torch.arange(n, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.unsqueeze(1) >> shifts.view(1, n, 1)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0] * n, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] with 32/bits codes per int32 along dim 1 -> int32 [R, C * 32/bits]."""
    n = 32 // bits
    shifts = torch.arange(n, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], packed.shape[1] * n)


def ggml_blocks(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric codes [out, in] (0 .. 2**bits - 1, zero point 2**(bits-1)) and one fp16 scale per
    32 inputs [out, in / 32] -> q4_0 (bits 4) or q8_0 (bits 8) block bytes [out, row_bytes]."""
    out_f, in_f = codes.shape
    nb = in_f // 32
    d = scales.to(torch.float16).contiguous().view(torch.uint8).reshape(out_f, nb, 2)
    c = codes.reshape(out_f, nb, 32)
    if bits == 4:
        qs = (c[..., :16] | (c[..., 16:] << 4)).to(torch.uint8)  # ggml: element j low nibble, j + 16 high
    else:
        qs = (c - 128).to(torch.int8).view(torch.uint8)
    return torch.cat([d, qs], dim=-1).reshape(out_f, -1)


class GptqLinearMethod(CheckpointLinearMethod):
    """See the module docstring. ``quant_config``: bits, group_size, checkpoint_format."""

    def __init__(self, qtype: str, **options: Any) -> None:
        super().__init__(qtype, **options)
        qc = self.quant_config
        self.bits = int(qc.get("bits", 4))
        if self.bits not in BITS:
            raise ValueError(f"{qtype} with {self.bits} bits is not supported (this build reads 2, 4 and 8 bits)")
        self.group_size = int(qc.get("group_size", 128))
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        self.zero_offset = 0 if fmt.endswith("v2") else 1  # v1 stores zero points minus one
        self.fast: str | None = None  # "q4_0" / "q8_0" / "affine" once converted
        self.pairs = 0  # affine: (s, b) pairs per super-block
        self._kernel: Any = None

    def groups(self, in_features: int) -> int:
        g = self.group_size
        if g == -1 or g >= in_features:
            return 1
        return -(-in_features // g)

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n = 32 // self.bits
        if in_features % n or out_features % n:
            raise ValueError(f"a [{out_features}, {in_features}] layer does not pack into {self.bits}-bit int32 words")
        g = self.groups(in_features)
        specs = {
            "qweight": ((in_features // n, out_features), torch.int32),
            "qzeros": ((g, out_features // n), torch.int32),
            "scales": ((g, out_features), torch.float16),
        }
        if "g_idx" in self.present:
            specs["g_idx"] = ((in_features,), torch.int32)
        return specs

    # -- the unpacked view -------------------------------------------------------------------
    def _group_index(self, layer: Linear) -> torch.Tensor:
        g_idx = layer._buffers.get("g_idx")
        if g_idx is not None:
            return g_idx.to(torch.int64)
        g = self.group_size if self.group_size > 0 else layer.in_features
        return torch.arange(layer.in_features, device=layer.qweight.device) // g

    def _zeros(self, layer: Linear) -> torch.Tensor:
        return unpack_cols(layer.qzeros, self.bits) + self.zero_offset  # [G, out]

    def _codes(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        """The codes of output rows r0..r1 as int32 [in, r1 - r0]."""
        return unpack_rows(layer.qweight[:, r0:r1], self.bits)

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        g_idx = self._group_index(layer)
        if int(g_idx.max()) >= layer.scales.shape[0] or int(g_idx.min()) < 0:
            raise ValueError(f"g_idx names group {int(g_idx.max())} of {layer.scales.shape[0]}")
        zeros = self._zeros(layer)
        g = self.group_size if self.group_size > 0 else layer.in_features
        in_order = bool(torch.equal(g_idx, torch.arange(layer.in_features, device=g_idx.device) // g))
        if (self.bits in (4, 8) and in_order and g % 32 == 0 and layer.in_features % 32 == 0
                and bool((zeros == 1 << (self.bits - 1)).all())):
            codes = self._codes(layer, 0, layer.out_features).t()  # [out, in]
            per32 = layer.scales.t().repeat_interleave(g // 32, dim=1)[:, : layer.in_features // 32]
            self.fast = "q4_0" if self.bits == 4 else "q8_0"
            return {"qweight": ggml_blocks(codes, per32, self.bits)}
        if self.bits in affine.BITS and in_order and affine.pairs_for(g, layer.in_features) is not None:
            codes = self._codes(layer, 0, layer.out_features).t()  # [out, in]
            s = layer.scales.t().to(torch.float32)
            packed, self.pairs = affine.pack(codes, s, -s * zeros.t().to(torch.float32), self.bits, g)
            self.fast = "affine"
            return {"qweight": packed}
        self._zeros_cache = zeros
        return None

    def describe(self) -> str:
        return f"{self.qtype} ({self.fast})" if self.fast else f"{self.qtype} {self.bits}-bit (reference)"

    def _rows(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        q = self._codes(layer, r0, r1)  # [in, r]
        zeros = getattr(self, "_zeros_cache", None)
        if zeros is None:
            zeros = self._zeros_cache = self._zeros(layer)
        z, s = zeros[:, r0:r1], layer.scales[:, r0:r1].to(torch.float32)
        if self._in_order(layer):  # groups are runs of g columns: broadcast instead of gathering per column
            n_in, groups = layer.in_features, z.shape[0]
            g = -(-n_in // groups)
            pad = groups * g - n_in
            qf = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
            w = (qf.view(groups, g, -1) - z.unsqueeze(1)).to(torch.float32) * s.unsqueeze(1)
            return w.view(groups * g, -1)[:n_in].t()
        g_idx = self._group_index(layer)
        return ((q - z[g_idx]).to(torch.float32) * s[g_idx]).t()

    def _in_order(self, layer: Linear) -> bool:
        cached = getattr(self, "_order_cache", None)
        if cached is None:
            g_idx = self._group_index(layer)
            groups = layer.scales.shape[0]
            g = -(-layer.in_features // groups)
            cached = self._order_cache = bool(torch.equal(g_idx, torch.arange(layer.in_features, device=g_idx.device) // g))
        return cached

    def dequantize(self, layer: Linear) -> torch.Tensor:
        if self.fast == "affine":
            return affine.dequantize(layer.qweight, layer.in_features, self.bits, self.pairs)
        if self.fast:
            from mistralrs_plugins.quant.ggml.formats import dequantize

            return dequantize(self.fast, layer.qweight, layer.in_features)
        return self._rows(layer, 0, layer.out_features)

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        if self.fast:
            kernel = self._kernel
            if kernel is None:
                kernel = self._kernel = lookup_kernel(f"qmatmul_{self.fast}", layer.qweight.device)
            if self.fast == "affine":
                return kernel(x, layer.qweight, None, bits=self.bits, pairs=self.pairs, out_f32=out_f32)
            return kernel(x, layer.qweight, None, out_f32=out_f32)
        y = chunked_reference_matmul(x, layer.out_features, layer.in_features, lambda a, b: self._rows(layer, a, b))
        return y if out_f32 else y.to(x.dtype)
