"""Re-quantizing a loaded model in place (``POST /re_isq``, ``Runner.send_re_isq``).

    counts = requantize(model, IsqPlan("q4k"))      # {type: layers}

Every `Linear` the plan targets gets the plan's method (type, sensitive-tensor promotion,
topology pins, shape fallbacks, ``moqe`` as at load) and is quantized from its current weight:
the float weight of an unquantized layer, or the dequantized weight of a quantized one (an ISQ,
GGUF or UQFF layer), one layer at a time, so memory grows by one layer's float weight at most.
A tied LM head made from the token table is the plan's ``lm_head``. Projections fused after
loading (q/k/v, gate/up) are fused again afterwards. The engine runs this between two steps
(`Engine.call_between_steps`), so queued and running requests continue with the new weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _float_weight(layer: Any) -> torch.Tensor:
    from mistralrs.nn.quantized import QuantizedLinearMethod

    method = layer.quant_method
    if isinstance(method, QuantizedLinearMethod) and method.is_quantized(layer):
        return method.dequantize(layer)
    return layer.weight.detach()


def requantize(model: nn.Module, plan: Any) -> dict[str, int]:
    """Quantize every targeted layer of `model` to the plan's type; returns {type: layers}.
    `plan`: an `IsqPlan`, or its ``method_for`` callable."""
    method_for = getattr(plan, "method_for", plan)
    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import Linear

    heads = {id(m.quantized_head) for m in model.modules() if isinstance(m, Embedding) and m.quantized_head is not None}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
            method = method_for("lm_head" if id(layer) in heads else name, layer)
            if method is None:
                continue
            weight = _float_weight(layer)
            bias = layer.bias.detach() if isinstance(layer.bias, torch.Tensor) else None
            with torch.device("meta"):
                layer.set_quant_method(method)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
            method.load_float(layer, weight)
            del weight
            counts[method.qtype] = counts.get(method.qtype, 0) + 1
        if not heads:  # a tied model loaded in float: its LM head is quantized from the table, as ISQ does
            quantize_tied_head(model, method_for)
            for m in model.modules():
                head: Any = m.quantized_head if isinstance(m, Embedding) else None
                if head is not None:
                    qtype = str(head.quant_method.qtype)
                    counts[qtype] = counts.get(qtype, 0) + 1
        for module in model.modules():
            after_loading = getattr(module, "after_loading", None)
            if callable(after_loading):
                after_loading()
    return counts


def quantize_tied_head(model: nn.Module, quant_method_for: Callable[[str, Any], Any]) -> None:
    """A model whose logits come from its token embedding (tied, no ``lm_head`` module) gets the
    LM head's quantizer too: the table is quantized once and serves both the logits and the
    embedding lookups (as a GGUF ``token_embd`` does), so no full-precision copy stays."""
    import torch

    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import Linear

    tied = getattr(model, "tied_embeddings", False)
    if callable(tied):
        tied = tied()
    if getattr(model, "lm_head", "absent") is not None or not tied:
        return
    embeddings = [m for m in model.modules() if isinstance(m, Embedding)]
    if len(embeddings) != 1 or embeddings[0].weight is None:
        return
    emb = embeddings[0]
    with torch.device("meta"):
        head = Linear(emb.embedding_dim, emb.num_embeddings)
        method = quant_method_for("lm_head", head)
        if method is None:
            return
        head.set_quant_method(method)
    method.load_float(head, emb.weight.detach())
    emb.set_quantized_head(head)
