"""The recurrent-state cache: the second cache kind, next to the paged KV blocks.

Hybrid models (Mamba-2, short-convolution and Gated-DeltaNet layers beside attention layers)
carry, per sequence and per recurrent layer, a fixed-size state that summarises everything the
layer has seen: it does not grow with the sequence, so it lives in *slots* (one per running
sequence), not in blocks. A model declares its states with ``recurrent_state_shape()``::

    {"num_layers": R,                                  # recurrent layers, numbered 0..R-1 on their own
     "states": {"conv": (C, K - 1), "ssm": (H, P, N)}, # per-sequence shape of each state tensor
     "float32": ("ssm",)}                              # states kept in float32 whatever the model dtype

The backend holds a `RecurrentStateCache` (``backend.states``) of ``num_slots`` slots; the engine
gives each running sequence a slot on admission and takes it back on finish or preemption
(`engine.kv_cache.StateSlots`); the step's `AttentionBatch.state_slots` names each sequence's
slot. A recurrent layer reads its states at the start of the step and writes them back at its
end (`AttentionBackend.read_state` / `write_state`). A sequence whose context is empty (a new
prompt, a preempted sequence recomputed from scratch) reads zeros, so a slot never needs
clearing; chunked prefill carries the state from one chunk to the next through the slot.

The state after a prefix is not kept per block, so a prefix-cache hit cannot restore it: the
engine turns prefix caching off for models with recurrent layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch


@attrs.frozen(kw_only=True)
class RecurrentStateShape:
    """What a backend needs to allocate a model's recurrent states (see the module docstring)."""

    num_layers: int
    states: tuple[tuple[str, tuple[int, ...]], ...]  # (name, per-sequence shape), same for every layer
    float32: frozenset[str] = frozenset()
    num_slots: int = 0  # sequences that can hold state at once; 0: no state cache
    dtype: Any = None  # torch dtype of the states not in `float32`
    device: Any = "cpu"

    @classmethod
    def from_model(cls, spec: dict, **fields: Any) -> RecurrentStateShape:
        """From a model's ``recurrent_state_shape()`` dict."""
        return cls(
            num_layers=int(spec["num_layers"]),
            states=tuple((str(k), tuple(int(d) for d in v)) for k, v in spec["states"].items()),
            float32=frozenset(spec.get("float32", ())),
            **fields,
        )

    def dtype_of(self, name: str) -> Any:
        import torch

        return torch.float32 if name in self.float32 else self.dtype

    def bytes_per_sequence(self) -> int:
        """Bytes one sequence's states take over all recurrent layers."""
        import torch

        total = 0
        for name, dims in self.states:
            n = 1
            for d in dims:
                n *= d
            total += n * torch.empty((), dtype=self.dtype_of(name)).element_size()
        return total * self.num_layers


class RecurrentStateCache:
    """``num_slots`` slots of every state of every recurrent layer: ``tensors[layer][name]`` is
    ``[num_slots, *shape]``."""

    def __init__(self, shape: RecurrentStateShape) -> None:
        import torch

        self.shape = shape
        self.tensors: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(shape.num_slots, *dims, dtype=shape.dtype_of(name), device=shape.device)
             for name, dims in shape.states}
            for _ in range(shape.num_layers)
        ]

    @property
    def num_slots(self) -> int:
        return self.shape.num_slots

    def read(self, layer: int, slots: torch.Tensor, fresh: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each state of `layer` for the sequences in `slots` ([S]); rows where `fresh` ([S] bool)
        is set are zeros (an empty context)."""
        out = {}
        for name, t in self.tensors[layer].items():
            x = t.index_select(0, slots)
            if fresh is not None:
                x = x.masked_fill(fresh.view(-1, *([1] * (x.dim() - 1))), 0)
            out[name] = x
        return out

    def write(self, layer: int, slots: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, x in values.items():
            t = self.tensors[layer][name]
            t.index_copy_(0, slots, x.to(t.dtype))


def zero_states(shape: RecurrentStateShape, num_seqs: int, device: Any) -> dict[str, torch.Tensor]:
    """Fresh (zero) states for `num_seqs` sequences of a batch that runs without a state cache."""
    import torch

    return {name: torch.zeros(num_seqs, *dims, dtype=shape.dtype_of(name), device=device)
            for name, dims in shape.states}
