"""AWQ checkpoints (AutoAWQ ``quant_method: "awq"``, ``version: "gemm"``), loaded as published.

Per quantized layer of weight [out, in], 4 bits, group size g (``group_size`` / ``q_group_size``):

- ``qweight`` int32 [in, out / 8]: codes packed along the *output* dim, eight per int32 in
  AutoAWQ's interleaved order: nibble k of word c holds output column 8c + AWQ_ORDER[k],
  AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7);
- ``qzeros``  int32 [in / g, out / 8]: zero points, packed the same way;
- ``scales``  float16 [in / g, out].

Dequantized: ``W[o, i] = scales[i // g, o] * (q[i, o] - zeros[i // g, o])``. Zero points are
per group and output (asymmetric), so layers run the reference path (dequantize blocks of output
rows, matmul in float32); a layer whose zero points are all 8 is q4_0 exactly, as for GPTQ.
``version: "gemv"`` (another packing) is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.linear import Linear
from mistralrs_plugins.quant.gptq.method import GptqLinearMethod, unpack_cols

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j of a group of 8 is nibble _INVERSE[j]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] in AWQ's packing -> int32 codes [R, 8C], columns in order."""
    nib = unpack_cols(packed, 4).reshape(packed.shape[0], packed.shape[1], 8)
    return nib[..., list(_INVERSE)].reshape(packed.shape[0], packed.shape[1] * 8)


class AwqLinearMethod(GptqLinearMethod):
    """See the module docstring."""

    def __init__(self, qtype: str, **options: Any) -> None:
        qc = dict(options.get("quant_config") or {})
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ with {bits} bits is not supported (AWQ checkpoints are 4-bit)")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (this build reads the GEMM packing)")
        qc.update(bits=4, group_size=int(qc.get("group_size", qc.get("q_group_size", 128))),
                  checkpoint_format="gptq_v2")  # zero points stored as they are
        super().__init__(qtype, **{**options, "quant_config": qc})

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if out_features % 8:
            raise ValueError(f"a [{out_features}, {in_features}] layer does not pack into AWQ's 8 codes per int32")
        g = self.groups(in_features)
        return {
            "qweight": ((in_features, out_features // 8), torch.int32),
            "qzeros": ((g, out_features // 8), torch.int32),
            "scales": ((g, out_features), torch.float16),
        }

    def _zeros(self, layer: Linear) -> torch.Tensor:
        return unpack_awq(layer.qzeros)

    def _codes(self, layer: Linear, r0: int, r1: int) -> torch.Tensor:
        c0, c1 = r0 // 8, -(-r1 // 8)
        return unpack_awq(layer.qweight[:, c0:c1])[:, r0 - 8 * c0:r1 - 8 * c0]
