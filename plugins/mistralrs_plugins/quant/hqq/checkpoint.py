"""HQQ checkpoints (``quantization_config.quant_method: "hqq"``), loaded as published, as
transformers' ``HqqConfig`` saves them: every quantized layer is hqq's ``HQQLinear.state_dict()``
under the layer's name (the meta values encoded as small tensors, hqq's
``encode_safetensor_type``):

- ``W_q``: the packed codes of the weight's view V [R, C] (`method.PACKINGS`: uint8, or int32
  for 3 bits; any dtype when ``view_as_float`` stored them as floats);
- ``scale``, ``zero``: per group, in the compute dtype; W = (q - zero) * scale;
- ``shape`` [out, in], ``nbits``, ``group_size``, ``axis`` (0: V = W.reshape(g, -1), a group per
  column; 1, transformers' default: V = W.reshape(-1, g), g consecutive weights of a row),
  ``packing`` ("4bit_u8", ...), and the flags ``view_as_float``, ``quant_scale``, ``quant_zero``,
  ``channel_wise``, ``optimize``, ``round_zero``, ``offload_meta``, ``compute_dtype``, ... (read
  for checking only).

``config.json``'s ``quant_config`` (one ``weight_quant_params`` for every layer, or one per layer
tag) is checked for bit widths; each layer's own tensors say how it is stored. The layer becomes
an HQQ layer of ``method.py`` (hqq4 / hqq8 exactly as the ISQ types store them when grouped along
axis 0); scales and zeros are held in float32 (the checkpoint's 16-bit values, exactly).
Execution is the HQQ reference path. Quantized scales or zeros (hqq's deprecated
``quant_scale``/``quant_zero``, which hqq itself cannot serialize) and non-channel-wise layers
are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod
from mistralrs_plugins.quant.hqq.method import PACKING_OF_BITS, PACKINGS, HqqLinearMethod

CHECKPOINT_BITS = (1, 2, 3, 4, 5, 6, 8)
_REQUIRED = ("W_q", "scale", "zero", "shape", "nbits", "group_size", "axis")


def weight_quant_params(qc: dict) -> list[dict]:
    """The ``weight_quant_params`` of every layer config a quantization_config holds."""
    nested = qc.get("quant_config")
    if not isinstance(nested, dict):
        return [qc] if "nbits" in qc else []
    if "weight_quant_params" in nested:
        configs = [nested]
    else:  # a config per layer tag ("self_attn.q_proj": {...}); None: the tag is not quantized
        configs = [c for c in nested.values() if isinstance(c, dict)]
    params = []
    for c in configs:
        if c.get("scale_quant_params") or c.get("zero_quant_params"):
            raise ValueError("HQQ with quantized scales or zeros (quant_scale / quant_zero) is not supported")
        if isinstance(c.get("weight_quant_params"), dict):
            params.append(c["weight_quant_params"])
    return params


def _bits(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer() or int(value) not in CHECKPOINT_BITS:
        raise ValueError(f"HQQ with {value} bits is not supported (this build reads "
                         f"{', '.join(map(str, CHECKPOINT_BITS))} bits)")
    return int(value)


def _text(t: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in t.reshape(-1).tolist())


def _flag(layer: Linear, name: str) -> bool:
    t = getattr(layer, name, None)
    return bool(t is not None and t.numel() == 1 and t.item())


class HqqCheckpointMethod(CheckpointLinearMethod, HqqLinearMethod):
    """See the module docstring."""

    marker = "W_q"
    supported_bits = CHECKPOINT_BITS

    def __init__(self, qtype: str, **options: Any) -> None:
        qc = dict(options.pop("quant_config", None) or {})
        bits = {_bits(p.get("nbits", 4)) for p in weight_quant_params(qc)}
        super().__init__(f"hqq{bits.pop() if len(bits) == 1 else 4}", quant_config=qc, **options)

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        # every tensor as the checkpoint holds it: shapes and dtypes are checked in `convert`
        names = dict.fromkeys(_REQUIRED) | dict.fromkeys(sorted(self.present - {"bias"}))
        return {name: (None, torch.float16 if name in ("scale", "zero") else torch.uint8) for name in names}

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        n_out, n_in = layer.out_features, layer.in_features
        value = layer.nbits.item()
        bits = _bits(value)
        packing = _text(layer.packing) if "packing" in self.present else PACKING_OF_BITS[bits]
        if packing != PACKING_OF_BITS[bits]:
            raise ValueError(f"{bits}-bit HQQ codes with packing {packing!r} (hqq packs them as "
                             f"{PACKING_OF_BITS[bits]!r})")
        if _flag(layer, "quant_scale") or _flag(layer, "quant_zero"):
            raise ValueError("HQQ with quantized scales or zeros (quant_scale / quant_zero) is not supported")
        if "channel_wise" in self.present and not _flag(layer, "channel_wise"):
            raise ValueError("HQQ without channel_wise groups (one scale for the whole weight) is not supported")
        shape = tuple(int(v) for v in layer.shape.reshape(-1).tolist())
        if shape != (n_out, n_in):
            raise ValueError(f"HQQ shape {list(shape)} for a [{n_out}, {n_in}] layer")
        g, axis = int(layer.group_size.item()), int(layer.axis.item())
        if axis not in (0, 1) or g <= 0 or (n_out * n_in) % g:
            raise ValueError(f"HQQ group size {g} along axis {axis} does not divide a [{n_out}, {n_in}] weight")
        m = n_out * n_in // g
        rows, cols = (g, m) if axis == 0 else (m, g)
        per, _width = PACKINGS[packing]
        codes = layer.W_q
        storage = torch.int32 if packing == "3bit_32" else torch.uint8
        if codes.dtype != storage:  # view_as_float: the codes' bytes stored as floats
            codes = codes.contiguous().view(storage)
        expected = (-(-rows // per) if packing == "3bit_32" else rows // per, cols)
        if tuple(codes.shape) != expected or (packing != "3bit_32" and rows % per):
            raise ValueError(f"W_q of shape {list(codes.shape)} for {bits}-bit groups of {g} along axis {axis} "
                             f"(expected {list(expected)})")
        groups = (1, m) if axis == 0 else (m, 1)
        if layer.scale.numel() != m or layer.zero.numel() != m:
            raise ValueError(f"scale {list(layer.scale.shape)} / zero {list(layer.zero.shape)} for {m} groups")
        self.bits, self.qtype, self.group_size, self.axis, self.packing = bits, f"hqq{bits}", g, axis, packing
        return {"qweight": codes, "scales": layer.scale.float().reshape(groups),
                "zeros": layer.zero.float().reshape(groups)}

    def describe(self) -> str:
        return f"{self.qtype} (groups of {self.group_size} along axis {self.axis})"
