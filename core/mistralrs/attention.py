"""The attention contract between models, the engine and attention-backend plugins.

A step's tokens from many sequences are flattened into one batch of T tokens (vLLM style):
one code path for prefill, chunked prefill and decode. `AttentionBatch` says which tokens
belong to which sequence and where their K/V live; models pass it to every attention layer
and never look inside. The backend owns the KV-cache layout: the engine's block manager only
hands out block ids.

KV slots: block b, offset o  ->  slot b * block_size + o. Token at position p of sequence i
lives in slot ``block_tables[i, p // block_size] * block_size + p % block_size``.

Recurrent layers (hybrid models) keep per-sequence state in the second cache kind,
`state_cache.RecurrentStateCache`: ``KVCacheShape.recurrent`` describes it, the batch's
`state_slots` name each sequence's slot, and layers go through `AttentionBackend.read_state` /
`write_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from mistralrs.state_cache import RecurrentStateCache, RecurrentStateShape, zero_states

if TYPE_CHECKING:
    import torch


@attrs.define(eq=False)
class AttentionBatch:
    """Attention metadata of one forward step.

    query_start_loc: S+1 offsets of each sequence's new tokens in the flat batch.
    seq_lens: per sequence, the total number of tokens whose K/V are visible after this step
        (cached context + new tokens). Context length = seq_len - query_len.
    slot_mapping: [T] int64 KV slot per new token, or None when there is no KV cache
        (the sequences then attend only among their new tokens; context must be 0).
    block_tables: [S, max_blocks] int32 block ids per sequence, or None without a cache.
    backend: the attention backend that owns the cache; layers call ``backend.attend``.
    scratch: per-step values a backend derives once in `prepare` and reuses in every layer.
    causal: False for encoders (embedding models): each token sees every token of its sequence
        (within `sliding_window` on either side). Only batches without a KV cache are non-causal.
    bidirectional: flat ranges [start, end) of new tokens, each inside one sequence's, whose
        tokens also see the range's later tokens (Gemma 3: an image's tokens, in prefill). On top
        of the causal rule; a sliding window W still hides keys at positions <= p - W. Models set
        it with `with_bidirectional`; the engine keeps such a range inside one prefill chunk.
    state_slots: [S] int64 recurrent-state slot per sequence (models with recurrent layers, when
        the backend has a state cache), or None: recurrent layers then start from zero states and
        keep nothing (context must be 0, as without a KV cache).
    """

    query_start_loc: list[int]
    seq_lens: list[int]
    backend: Any
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    scratch: dict[str, Any] = attrs.field(factory=dict)
    causal: bool = True
    bidirectional: tuple[tuple[int, int], ...] = ()
    state_slots: torch.Tensor | None = None

    def with_bidirectional(self, ranges: tuple[tuple[int, int], ...]) -> AttentionBatch:
        """This step's batch with `ranges` attending bidirectionally (same cache, same scratch)."""
        return attrs.evolve(self, bidirectional=tuple(ranges)) if ranges else self

    def seq_bidirectional(self, i: int) -> list[tuple[int, int]]:
        """Sequence i's bidirectional ranges as positions (context length + offset in its chunk)."""
        qs, qe = self.query_start_loc[i], self.query_start_loc[i + 1]
        ctx = self.seq_lens[i] - (qe - qs)
        return [(ctx + lo - qs, ctx + hi - qs) for lo, hi in self.bidirectional if qs <= lo and hi <= qe]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]

    @property
    def context_lens(self) -> list[int]:
        return [s - q for s, q in zip(self.seq_lens, self.query_lens)]

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


@attrs.frozen(kw_only=True)
class KVCacheShape:
    """What a backend needs to allocate a model's KV cache.

    `v_from_k`: the value of each slot is the first `v_head_dim` dims of its key, so only keys are
    stored (multi-head latent attention: one "KV head" holding the compressed latent and the
    rope key; the value is the latent). Backends then keep no value cache of their own: their
    value views are ``k_cache[..., :v_head_dim]``, and `attend` ignores the `v` it is given
    beyond using it for cache-less batches (where it must equal ``k[..., :v_head_dim]``).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    v_from_k: bool = False
    num_blocks: int = 0
    block_size: int = 32
    dtype: Any = None  # torch dtype of the cache
    device: Any = "cpu"
    recurrent: RecurrentStateShape | None = None  # the model's recurrent states (hybrid models)


class AttentionBackend:
    """Base class of attention backends. Subclasses implement `attend`.

    Construct with a `KVCacheShape` (num_blocks=0 means no cache). `prepare(batch)` runs once
    per step before the model forward; `attend` runs once per attention layer.
    """

    name = "base"
    paged = False

    def __init__(self, shape: KVCacheShape) -> None:
        self.shape = shape
        rec = shape.recurrent
        # the second cache kind: per-sequence recurrent state, in slots (layout-free, so every
        # backend shares this one)
        self.states: RecurrentStateCache | None = (
            RecurrentStateCache(rec) if rec is not None and rec.num_slots > 0 and shape.num_blocks > 0 else None
        )

    @property
    def num_blocks(self) -> int:
        return self.shape.num_blocks

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    def bytes_per_block(self) -> int:
        import torch

        s = self.shape
        itemsize = torch.empty((), dtype=s.dtype).element_size()
        return s.block_size * kv_elements_per_token(attrs.asdict(s)) * itemsize

    def batch(
        self,
        query_start_loc: list[int],
        seq_lens: list[int],
        slot_mapping: torch.Tensor | None = None,
        block_tables: torch.Tensor | None = None,
        *,
        causal: bool = True,
        state_slots: torch.Tensor | None = None,
    ) -> AttentionBatch:
        b = AttentionBatch(query_start_loc, seq_lens, self, slot_mapping, block_tables, causal=causal,
                           state_slots=state_slots)
        self.prepare(b)
        return b

    # -- recurrent state (the second cache kind) -------------------------------------------------
    def read_state(self, layer: int, batch: AttentionBatch, device: Any = None) -> dict[str, torch.Tensor]:
        """Recurrent layer `layer`'s states for the batch's sequences, ``name -> [S, *shape]``:
        zeros for a sequence with no context, its slot's state otherwise."""
        rec = self.shape.recurrent
        if rec is None:
            raise ValueError("this model declared no recurrent states (recurrent_state_shape)")
        if self.states is None or batch.state_slots is None:
            if any(batch.context_lens):
                raise ValueError("a batch with cached context needs state slots for its recurrent layers")
            return zero_states(rec, batch.num_seqs, device or rec.device)
        fresh = batch.scratch.get("state_fresh")
        if fresh is None:
            import torch

            fresh = batch.scratch["state_fresh"] = torch.tensor(
                [c == 0 for c in batch.context_lens], device=batch.state_slots.device)
        return self.states.read(layer, batch.state_slots, fresh)

    def write_state(self, layer: int, batch: AttentionBatch, values: dict[str, torch.Tensor]) -> None:
        """Store recurrent layer `layer`'s states after this step (``name -> [S, *shape]``); a
        batch without state slots keeps nothing."""
        if self.states is not None and batch.state_slots is not None:
            self.states.write(layer, batch.state_slots, values)

    def static_decode_batch(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor) -> AttentionBatch | None:
        """A decode-only batch (one new token per sequence) whose per-step values all live in the given
        device tensors (slot_mapping [S], block_tables [S, W], seq_lens [S]), so that a captured CUDA
        graph replays it after they are updated in place (`engine.decode_graphs`); None when the backend's
        decode path reads host values each step (the default)."""
        return None

    def prepare(self, batch: AttentionBatch) -> None:  # noqa: B027 - optional hook
        """Derive per-step values (masks, gathered indices) once; stored in batch.scratch."""

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: AttentionBatch,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, Dv] for the new tokens -> out[T, Hq, Dv].

        Writes k/v into the cache slots first (when there is a cache), then attends each new
        token to its sequence's visible keys, causally (unless ``batch.causal`` is False: then to
        all of them), and inside each of ``batch.bidirectional``'s ranges to the whole range.
        `sliding_window` W: a query at position p sees keys at positions > p - W
        (non-causal: |p - k| < W). `softcap` c: scores -> c * tanh(scores / c).
        `sinks` [Hq] (GPT-OSS): one extra logit per query head in each softmax's denominator,
        attached to no value (``softmax([scores, sink])`` with the sink's column dropped).
        """
        raise NotImplementedError

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst (copy-on-write for forked sequences)."""
        raise NotImplementedError


def consecutive_runs(index: torch.Tensor, query_start_loc: list[int]) -> tuple[tuple[int, int], ...]:
    """Maximal runs [start, end) of consecutive flat token indices (sorted), split where a
    sequence's new tokens end: the ranges of `AttentionBatch.bidirectional` for, e.g., the
    image tokens a vision model fills in."""
    runs: list[tuple[int, int]] = []
    bounds = set(query_start_loc)
    for t in index.tolist():
        if runs and runs[-1][1] == t and t not in bounds:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return tuple(runs)


def kv_elements_per_token(kv: dict[str, Any]) -> int:
    """Cache elements one token takes over all layers, from a model's ``kv_cache_shape()`` dict
    (or a `KVCacheShape` as a dict): keys and values, or keys only when ``v_from_k``."""
    per_head = kv["head_dim"] + (0 if kv.get("v_from_k") else (kv.get("v_head_dim") or kv["head_dim"]))
    return int(kv["num_layers"] * kv["num_kv_heads"] * per_head)


# -- KV slot I/O: the cache layout every backend and reference op shares -------------------------
def _fp8(dtype: Any) -> bool:
    return "float8" in str(dtype)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slots] = x, converting to the cache dtype (fp8 caches go through a byte view,
    since torch has no fp8 index_copy on CPU)."""
    import torch

    if _fp8(cache.dtype):
        cache.view(torch.uint8).index_copy_(0, slots, x.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, slots, x.to(cache.dtype))


def read_slots(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots] as `dtype` (fp8 caches are read through a byte view, as written)."""
    import torch

    if _fp8(cache.dtype):
        return cache.view(torch.uint8)[slots].view(cache.dtype).to(dtype)
    return cache[slots].to(dtype)
