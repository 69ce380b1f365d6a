"""MLX checkpoints (AFQ: ``config.json`` ``quantization: {"group_size": 64, "bits": 4}``, or a
``quantization_config`` with ``quant_method: "afq"`` / only bits and group size), loaded as
published, as ``mlx_lm`` writes them.

Per quantized layer of weight [out, in]: ``weight`` uint32 [out, in * bits / 32] (the codes as one
little-endian bit stream per row), ``scales`` and ``biases`` [out, in / group_size] in the
model's 16-bit dtype; ``W = q * scale + bias`` -- exactly the AFQ layout of ``method.py``, so
the layer becomes an `AfqLinearMethod` layer. mlx_lm quantizes token embeddings too: such a
table keeps its codes and looks rows up (the Embedding's quantized table).
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod
from mistralrs_plugins.quant.afq.method import BITS, GROUP_SIZES, AfqLinearMethod


class AfqCheckpointMethod(CheckpointLinearMethod, AfqLinearMethod):
    """See the module docstring."""

    marker = "biases"

    def __init__(self, qtype: str, **options: Any) -> None:
        qc = dict(options.pop("quant_config", None) or {})
        bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", 64))
        if bits not in BITS:
            raise ValueError(f"AFQ/MLX with {bits} bits is not supported (this build reads {', '.join(map(str, BITS))})")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"AFQ/MLX group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
        super().__init__(f"afq{bits}", quant_config=qc, group_size=group_size, **options)

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        if (in_features * self.bits) % 32 or in_features % self.group_size:
            raise ValueError(f"a [{out_features}, {in_features}] layer does not take {self.bits}-bit groups of "
                             f"{self.group_size}")
        return {
            "weight": ((out_features, in_features * self.bits // 32), torch.uint32),
            "scales": (None, torch.float16),  # the checkpoint's 16-bit dtype, as it is
            "biases": (None, torch.float16),
        }

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        groups = (layer.out_features, layer.in_features // self.group_size)
        if tuple(layer.scales.shape) != groups or tuple(layer.biases.shape) != groups:
            raise ValueError(f"scales {list(layer.scales.shape)} / biases {list(layer.biases.shape)} for "
                             f"{list(groups)} groups")
        return {"qweight": layer.weight.view(torch.uint8), "scales": layer.scales, "biases": layer.biases}

    def describe(self) -> str:
        return self.qtype
