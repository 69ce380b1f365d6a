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
    """Quantize every targeted layer of `model` to the plan's type; returns {type: layers}."""
    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import Linear

    heads = {id(m.quantized_head) for m in model.modules() if isinstance(m, Embedding) and m.quantized_head is not None}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
            method = plan.method_for("lm_head" if id(layer) in heads else name, layer)
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
            from mistralrs.loading import quantize_tied_head

            quantize_tied_head(model, plan.method_for)
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
