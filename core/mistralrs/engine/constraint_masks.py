"""The allowed-token mask of a decode batch: `batch_masks(states, vocab_size)` fills the rows of
all constrained sequences with llguidance (in one call of its thread pool on machines with
many CPUs) and expands them to the [S, V] bool mask `Sampler.sample` takes."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from mistralrs.engine.bitmask import all_allowed, put_rows, rows_from_bitmask
from mistralrs.engine.constraint_factory import ConstraintState, llg_module

_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


PARALLEL_MIN_CPUS = 8
"""`batch_masks` uses llguidance's thread pool by default only on machines with at least this
many CPUs. Filling the 16 masks of a JSON-schema batch takes ~0.1-0.3 ms sequentially at a
32k vocabulary; on a small, busy machine waking the pool's threads costs more than it saves
(2 CPUs: p95 3-17 ms with the pool, by load, against 0.5-0.8 ms without; see
benchmarks/constraints.py)."""


def _executor_threads() -> int:
    """Threads of the mask executor: $MISTRALRS_GRAMMAR_THREADS, else the CPU count (max 32)."""
    threads = os.environ.get("MISTRALRS_GRAMMAR_THREADS")
    try:
        return max(1, int(threads)) if threads else max(1, min(32, os.cpu_count() or 1))
    except ValueError:
        return 1


def _parallel_default() -> bool:
    """Use the executor? $MISTRALRS_GRAMMAR_THREADS > 1 forces it on (= 1 off); else only on
    machines with PARALLEL_MIN_CPUS or more CPUs."""
    if os.environ.get("MISTRALRS_GRAMMAR_THREADS"):
        return _executor_threads() > 1
    return (os.cpu_count() or 1) >= PARALLEL_MIN_CPUS


def _executor() -> Any:
    """The process-wide llguidance executor (a Rust thread pool) for parallel mask filling."""
    global _EXECUTOR
    if _EXECUTOR is None:
        with _EXECUTOR_LOCK:
            if _EXECUTOR is None:
                _EXECUTOR = llg_module().LLExecutor(num_threads=_executor_threads())
    return _EXECUTOR


def batch_masks(
    states: Sequence[ConstraintState | None], vocab_size: int, *, parallel: bool | None = None
) -> torch.Tensor | None:
    """The [S, vocab_size] bool allowed-token mask of a batch (row i for states[i]): rows
    whose state is None are all True. None when no row has a constraint.

    All constrained rows of one factory are filled into one int32 bitmask (llguidance releases
    the GIL), then expanded to bool with vectorised ops. With `parallel` the rows are filled by
    one `LLExecutor` call (llguidance's Rust thread pool, parallel over sequences), else one
    after the other in the calling thread. Default: parallel on machines with at least
    `PARALLEL_MIN_CPUS` CPUs, or as $MISTRALRS_GRAMMAR_THREADS says (> 1: a pool of that
    many threads; 1: sequential).

    Safe to call from a worker thread (e.g. to overlap with the forward pass) as long as
    nothing advances the same states meanwhile."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    vocab_size = int(vocab_size)
    groups: dict[int, list[int]] = {}
    for i in rows:
        groups.setdefault(id(states[i].factory), []).append(i)  # type: ignore[union-attr]
    out: torch.Tensor | None = None
    for idx in groups.values():
        factory = states[idx[0]].factory  # type: ignore[union-attr]
        # One fill per distinct state (a state listed twice would be borrowed twice by the pool).
        slot: dict[int, int] = {}
        unique: list[ConstraintState] = []
        for i in idx:
            if slot.setdefault(id(states[i]), len(unique)) == len(unique):
                unique.append(states[i])  # type: ignore[arg-type]
        bitmask = torch.empty(len(unique), factory.mask_words, dtype=torch.int32)
        use_par = parallel if parallel is not None else (len(unique) > 1 and _parallel_default())
        if not use_par or len(unique) == 1:
            for k, st in enumerate(unique):
                st.fill_bitmask(bitmask[k])
        else:
            matchers = [(st._matcher, k) for k, st in enumerate(unique)]
            _executor().unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), factory.mask_words * 4, len(unique))
        if len(unique) < len(idx):
            bitmask = bitmask[[slot[id(states[i])] for i in idx]]
        block = rows_from_bitmask(bitmask, factory, vocab_size)
        if len(idx) == len(states):  # every row constrained by one factory: no copy
            return block
        if out is None:
            out = all_allowed(len(states), vocab_size)
        put_rows(out, idx, block)
    return out
