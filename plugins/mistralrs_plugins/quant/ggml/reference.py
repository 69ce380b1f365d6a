"""The torch reference of every ``qmatmul_<type>`` op: dequantize the blocks, matmul in fp32.

``qmatmul_<type>(x[M, K], qweight uint8[N, row_bytes], bias[N] | None, *, out_f32=False)``
(or, for the types of `interleave.TYPES`, the interleaved [N / 8, interleave.row_bytes(K)]) returns ``x @ W.T + b`` in x's dtype (fp32 with `out_f32`). Correct for every type and slow
(it dequantizes the whole weight per call); native kernels replace it where they run. The
dequantize-only GGUF types (i-quants, TQ1_0/TQ2_0, MXFP4) have only this path. Also the reference of
``moe_experts_ggml`` (a mixture's experts of GGML blocks, stacked).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistralrs.nn.torch_ops import silu_and_mul
from mistralrs_plugins.quant.ggml import DEQUANT_ONLY_TYPES, TYPES, interleave
from mistralrs_plugins.quant.ggml.formats import ALL_FORMATS, dequantize


def in_features(name: str, qweight: torch.Tensor) -> int:
    fmt = ALL_FORMATS[name]
    return qweight.shape[-1] // fmt.type_size * fmt.block_size


def _make(name: str) -> Callable[..., torch.Tensor]:
    def qmatmul(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
        if name in interleave.TYPES and qweight.dim() == 2 and x.dim() and \
                qweight.shape[-1] == interleave.row_bytes(name, x.shape[-1]) != 0:
            # a layer kept interleaved for a kernel that did not take this call
            qweight = interleave.deinterleave(name, qweight)
        w = dequantize(name, qweight, in_features(name, qweight))
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return y if out_f32 else y.to(x.dtype)

    qmatmul.__name__ = qmatmul.__qualname__ = f"qmatmul_{name}"
    return qmatmul


for _name in (*TYPES, *DEQUANT_ONLY_TYPES):
    globals()[f"qmatmul_{_name}"] = _make(_name)


def moe_experts_ggml(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor, qtype: str) -> torch.Tensor:
    """The torch reference of the op ``moe_experts_ggml``: `mistralrs.nn.torch_ops.moe_experts` with experts of
    GGML blocks of type `qtype`: w13 uint8 [E, 2I, row bytes of H] (each expert's gate rows then up rows of
    llama.cpp's block bytes), w2 uint8 [E, H, row bytes of I]. Each expert's matmuls are this module's
    ``qmatmul_<qtype>`` (dequantize, fp32 matmul, rounded to x's dtype): the arithmetic of `SparseMoE`'s loop
    over GGML experts."""
    matmul = globals()[f"qmatmul_{qtype}"]
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        token_idx, k_pos = torch.where(topk_ids == e)
        h = matmul(silu_and_mul(matmul(x[token_idx], w13[e], None)), w2[e], None)
        h = h * topk_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out
