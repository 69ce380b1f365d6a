"""Token embeddings and logits through the LM head (tied or not)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    """weight [num_embeddings, dim]. `scale` multiplies the output (Gemma: sqrt(hidden), rounded
    to the activation dtype first, as HF does)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, scale: float | None = None) -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(self.num_embeddings, self.embedding_dim), requires_grad=False)
        # A quantized LM head made from this (tied) table: it serves the logits, and the lookups
        # when its method can dequantize single rows (then the float table is dropped).
        self.quantized_head: nn.Module | None = None
        self.out_dtype: torch.dtype | None = None

    def set_quantized_head(self, head: nn.Module) -> None:
        self.quantized_head = head  # a registered submodule: its state is in state_dict()
        if callable(getattr(head.quant_method, "dequantize_rows", None)):
            self.out_dtype = self.weight.dtype
            del self._parameters["weight"]
            self.weight = None  # type: ignore[assignment]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            head = self.quantized_head
            x = head.quant_method.dequantize_rows(head, input_ids).to(self.out_dtype)  # type: ignore[union-attr]
        else:
            x = F.embedding(input_ids, self.weight)
        if self.scale is not None:
            # the scale rounded to x's dtype first (a factory op, not torch.tensor: decode graphs record it)
            x = x * torch.full((), self.scale, dtype=x.dtype, device=x.device)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scale={self.scale}"

    _bf16_kernel = None

    def bf16_kernel(self):
        """The `linear_bf16` kernel for the tied LM head on the CPU (looked up once per module)."""
        if self._bf16_kernel is None:
            from mistralrs.nn.linear import cpu_linear_bf16

            self._bf16_kernel = cpu_linear_bf16()
        return self._bf16_kernel


def compute_logits(hidden: torch.Tensor, lm_head: nn.Module | None, embedding: Embedding | None = None,
                   *, softcap: float | None = None) -> torch.Tensor:
    """hidden [S, H] -> float32 logits [S, V] through `lm_head`, or through the embedding's weight
    when the head is tied (`lm_head` None). `softcap` c: logits -> c * tanh(logits / c).

    bf16 on the CPU goes through the `linear_bf16` kernel with fp32 output: the logits are never
    rounded to bf16, and no separate conversion pass runs over [S, vocab]."""
    from mistralrs.nn.linear import Linear, UnquantizedLinearMethod, cpu_linear_bf16

    if lm_head is None and embedding is None:
        raise ValueError("compute_logits needs an lm_head or a tied embedding")
    from mistralrs.nn.quantized import QuantizedLinearMethod

    weight = bias = None
    head = lm_head if lm_head is not None else embedding.quantized_head  # type: ignore[union-attr]
    if isinstance(head, Linear) and isinstance(head.quant_method, QuantizedLinearMethod):
        logits = head.quant_method.apply(head, hidden, out_f32=True)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits
    if lm_head is None:
        weight = embedding.weight  # type: ignore[union-attr]
    elif isinstance(lm_head, Linear) and type(lm_head.quant_method) is UnquantizedLinearMethod:
        weight, bias = lm_head.weight, lm_head.bias
    if weight is not None and hidden.dtype is torch.bfloat16 and hidden.device.type == "cpu":
        kernel = embedding.bf16_kernel() if embedding is not None else cpu_linear_bf16()
        logits = kernel(hidden, weight, bias, out_f32=True)
    elif lm_head is not None:
        logits = lm_head(hidden)
    else:
        assert weight is not None  # the tied embedding's
        logits = F.linear(hidden, weight)
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
