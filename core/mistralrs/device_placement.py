"""Applying a `device_map.Placement` to a model, and the KV cache split along it.

The loader casts `float32_layers` (CPU-offloaded layers) on the meta-device model,
materialises each module on `device_of(name)` (`loading.materialize`), fills the weights, then
`install` adds forward pre-hooks that move a module's tensor inputs to its device (and floating
ones to its dtype) at every layer boundary, and wraps `compute_logits` for the head's device.
`MappedBackend` holds one attention backend per placement group, each with the KV cache of its
own layers on its own device; layers address it by their global index as with any backend.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch
from torch import nn

from mistralrs.attention import AttentionBackend, AttentionBatch
from mistralrs.device_map import Placement

_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)$")


def decoder_layers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """index -> (name, module) of the decoder layers (``...layers.N``, ``...h.N``, ``...blocks.N``)."""
    out: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        m = _LAYER.match(name)
        if m and int(m.group(1)) not in out:
            out[int(m.group(1))] = (name, module)
    return out


def device_of(placement: Placement, layers: dict[int, tuple[str, nn.Module]]) -> Any:
    """name -> device for `loading.materialize`: a layer's group device inside it, the head's for
    ``lm_head``, else the primary device."""
    prefixes = sorted(((name + ".", placement.layer_device(i)) for i, (name, _) in layers.items()
                       if i < placement.num_layers), key=lambda p: -len(p[0]))

    def of(name: str) -> str:
        dotted = name + "."
        for prefix, device in prefixes:
            if dotted.startswith(prefix):
                return device
        if name == "lm_head" or name.startswith("lm_head."):
            return placement.head
        return placement.primary

    return of


def float32_layers(model: nn.Module, placement: Placement) -> list[nn.Module]:
    """The decoder layers of the plan's fp32 groups (the loader casts them on the meta device)."""
    from mistralrs.errors import ModelLoadError

    layers = decoder_layers(model)
    if len(layers) != placement.num_layers:
        raise ModelLoadError(f"the device map covers {placement.num_layers} layers but the model has {len(layers)} "
                             "decoder layers; device mapping needs a decoder-layer stack")
    return [layer for i, (_, layer) in sorted(layers.items()) if placement.layer_group[i] in placement.float32_groups]


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _move(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and dtype is not None and x.dtype != dtype:
            return x.to(device=device, dtype=dtype)
        return x.to(device) if x.device != device else x
    if isinstance(x, tuple):
        return tuple(_move(v, device, dtype) for v in x)
    if isinstance(x, list):
        return [_move(v, device, dtype) for v in x]
    return x


def _mover(device: Any, dtype: torch.dtype | None) -> Any:
    dev = torch.device(device)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _move(args, dev, dtype), {k: _move(v, dev, dtype) for k, v in kwargs.items()}

    return hook


def install(model: nn.Module, placement: Placement) -> None:
    """Forward pre-hooks at every boundary: each decoder layer, and each module outside the layers
    that owns parameters (embeddings, final norm, head); `compute_logits` moves the hidden states
    to the head. Sets ``model.device_placement``."""
    layers = decoder_layers(model)
    inside: set[str] = set()
    for i, (name, layer) in layers.items():
        layer.register_forward_pre_hook(_mover(placement.layer_device(i), _module_dtype(layer)), with_kwargs=True)
        inside.add(name)
    for name, module in model.named_modules():
        if not name or any(name == n or name.startswith(n + ".") for n in inside):
            continue
        own = [p for p in module.parameters(recurse=False)]
        if own:
            module.register_forward_pre_hook(_mover(own[0].device, _module_dtype(module)), with_kwargs=True)
    head = torch.device(placement.head)
    original: Any = model.compute_logits

    def compute_logits(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return original(hidden.to(head), *args, **kwargs)

    object.__setattr__(model, "compute_logits", compute_logits)
    object.__setattr__(model, "device_placement", placement)


class MappedBackend(AttentionBackend):
    """One attention backend per placement group; `attend(layer, ...)` goes to the group holding
    the layer (with its local index) and the step's batch moved to that group's device once."""

    def __init__(self, subs: list[AttentionBackend], layer_map: list[tuple[int, int]], recurrent: Any = None) -> None:
        super().__init__(attrs.evolve(subs[0].shape, recurrent=recurrent))  # its own: recurrent states
        self.subs = subs
        self.layer_map = layer_map  # global layer -> (group, local layer)
        self.name = "mapped[" + ",".join(f"{s.name}@{s.shape.device}" for s in subs) + "]"
        self.paged = all(s.paged for s in subs)

    def bytes_per_block(self) -> int:
        return sum(s.bytes_per_block() for s in self.subs)

    def batch(self, query_start_loc: list[int], seq_lens: list[int], slot_mapping: torch.Tensor | None = None,
              block_tables: torch.Tensor | None = None, *, causal: bool = True,
              state_slots: torch.Tensor | None = None) -> AttentionBatch:
        b = AttentionBatch(query_start_loc, seq_lens, self, slot_mapping, block_tables, causal=causal,
                           state_slots=state_slots)
        per_device: dict[str, tuple[Any, Any]] = {}
        groups = []
        for sub in self.subs:
            key = str(sub.shape.device)
            if key not in per_device:
                dev = torch.device(sub.shape.device)
                per_device[key] = (None if slot_mapping is None else slot_mapping.to(dev),
                                   None if block_tables is None else block_tables.to(dev))
            sm, bt = per_device[key]
            groups.append(sub.batch(query_start_loc, seq_lens, sm, bt, causal=causal))
        b.scratch["groups"] = groups
        return b

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch,
               **kwargs: Any) -> torch.Tensor:
        group, local = self.layer_map[layer]
        return self.subs[group].attend(local, q, k, v, batch.scratch["groups"][group], **kwargs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for sub in self.subs:
            sub.copy_blocks(pairs)


def layer_map(placement: Placement) -> list[tuple[int, int]]:
    """Global layer -> (group, index among the group's layers)."""
    counts: dict[int, int] = {}
    out = []
    for g in placement.layer_group:
        out.append((g, counts.get(g, 0)))
        counts[g] = counts.get(g, 0) + 1
    return out
