"""The torch reference of every ``qmatmul_<type>`` op: dequantize the blocks, matmul in fp32.

``qmatmul_<type>(x[M, K], qweight uint8[N, row_bytes], bias[N] | None, *, out_f32=False)``
returns ``x @ W.T + b`` in x's dtype (fp32 with `out_f32`). Correct for every type and slow
(it dequantizes the whole weight per call); native kernels replace it where they run. The
dequantize-only GGUF types (i-quants, TQ1_0/TQ2_0, MXFP4) have only this path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistralrs_plugins.quant.ggml import DEQUANT_ONLY_TYPES, TYPES
from mistralrs_plugins.quant.ggml.formats import ALL_FORMATS, dequantize


def in_features(name: str, qweight: torch.Tensor) -> int:
    fmt = ALL_FORMATS[name]
    return qweight.shape[-1] // fmt.type_size * fmt.block_size


def _make(name: str) -> Callable[..., torch.Tensor]:
    def qmatmul(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
        w = dequantize(name, qweight, in_features(name, qweight))
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return y if out_f32 else y.to(x.dtype)

    qmatmul.__name__ = qmatmul.__qualname__ = f"qmatmul_{name}"
    return qmatmul


for _name in (*TYPES, *DEQUANT_ONLY_TYPES):
    globals()[f"qmatmul_{_name}"] = _make(_name)
