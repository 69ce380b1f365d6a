"""MXFP4 checkpoints (``quantization_config.quant_method: "mxfp4"``, GPT-OSS's format), loaded as
published.

OCP microscaling FP4: blocks of 32 weights along ``in_features``, each an e8m0 scale byte (2^(s -
127)) and 32 e2m1 codes (sign, 2-bit exponent, 1-bit mantissa: 0, 0.5, 1, 1.5, 2, 3, 4, 6),
two per byte, the even element in the low nibble (transformers' ``convert_moe_packed_tensors``).
Per quantized layer of weight [out, in]:

- ``blocks`` uint8 [out, in / 2] (mistral.rs's linear layout) or [out, in / 32, 16] (GPT-OSS's);
- ``scales`` uint8 [out, in / 32].

MoE experts stored stacked, as GPT-OSS does (``mlp.experts.gate_up_proj_blocks`` [E, 2I, in / 32,
16] and ``..._scales`` [E, 2I, in / 32], ``down_proj_blocks`` likewise), are split by the
architecture like its float fused experts (`fused_suffixes`): each expert's gate, up and down
layers get their own ``blocks`` and ``scales``. ``W = e2m1(code) * 2^(scale - 127)``.

These are GGML's MXFP4 blocks with the 32 codes in another order: the layer is re-laid out at
load, without loss, as the 17-byte blocks of the GGML ``mxfp4`` type (scale byte, then byte j =
code j | code j + 16 << 4) and becomes a GGML ``mxfp4`` layer (decoding and the reference
dequantize-then-matmul path are the GGML plugin's, `iquants`), equal to transformers'
dequantization for every scale but 255 (e8m0's NaN, which checkpoints do not hold).
"""

from __future__ import annotations

from typing import Any

import torch

from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import CheckpointLinearMethod
from mistralrs_plugins.quant.ggml.method import GgmlLinearMethod

BLOCK = 32


def ggml_mxfp4_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """HF MXFP4 (blocks uint8 [rows, G, 16], scales uint8 [rows, G]) -> GGML mxfp4 block bytes
    uint8 [rows, G * 17]: the same codes and scales, re-laid out."""
    rows, groups = scales.shape
    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).reshape(rows, groups, BLOCK)  # element order
    qs = codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)
    return torch.cat([scales.unsqueeze(-1), qs], -1).reshape(rows, groups * (BLOCK // 2 + 1))


class Mxfp4CheckpointMethod(CheckpointLinearMethod, GgmlLinearMethod):
    """See the module docstring."""

    marker = "blocks"
    fused_suffixes = (("_blocks", "blocks"), ("_scales", "scales"))
    rows_state = False  # the checkpoint tensors stay registered until `convert`: no row fusion

    def __init__(self, qtype: str, **options: Any) -> None:
        options.pop("quant_config", None)
        super().__init__("mxfp4", quant_config=None, **options)

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        if in_features % BLOCK:
            raise ValueError(f"a [{out_features}, {in_features}] layer is not whole MXFP4 blocks of {BLOCK}")
        return {"blocks": (None, torch.uint8), "scales": ((out_features, in_features // BLOCK), torch.uint8)}

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        n_out, groups = layer.out_features, layer.in_features // BLOCK
        blocks = layer.blocks
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) not in ((n_out, groups * 16), (n_out, groups, 16)):
            raise ValueError(f"MXFP4 blocks {blocks.dtype} {list(blocks.shape)} for a [{n_out}, {layer.in_features}] "
                             f"layer (expected uint8 [{n_out}, {groups * 16}] or [{n_out}, {groups}, 16])")
        return {"qweight": ggml_mxfp4_blocks(blocks.reshape(n_out, groups, 16), layer.scales)}

    def describe(self) -> str:
        return "mxfp4 (checkpoint)"
