"""Continuous batching under a token budget: chunked prefill and decode in one step.

Each step: running sequences first (FCFS), each taking min(pending, budget) tokens; when KV
blocks run out the most recently admitted running sequence is preempted (its blocks freed, it
goes back to the front of the queue and is recomputed later — the prefix cache usually
revives its blocks). Then waiting sequences are admitted FCFS while there is budget, a free
slot (max_seqs) and blocks, starting after their longest cached prefix. For models with
recurrent layers each admitted sequence also takes a recurrent-state slot (`StateSlots`), given
back with its blocks.
"""

from __future__ import annotations

from collections import deque

import attrs

from mistralrs.engine.kv_cache import BlockPool, NoFreeBlocks, StateSlots, block_hashes
from mistralrs.engine.sequence import Sequence, Status
from mistralrs.multimodal.inputs import hash_tokens


@attrs.define
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """True when this step completes the sequence's pending tokens, so a token is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


def chunk_size(seq: Sequence, budget: int) -> int:
    """Tokens of `seq` to run this step: its pending ones, up to the budget, with a prefill chunk
    never ending inside an image's placeholder tokens (the chunk stops before the image, or takes
    all of it when the image is where it starts, even past the budget)."""
    n = min(seq.num_pending, budget)
    start = seq.num_computed
    for item in getattr(seq.request, "mm", ()):
        if item.offset < start + n < item.end:
            n = item.offset - start if item.offset > start else item.end - start
            break
    return n


class Scheduler:
    def __init__(self, pool: BlockPool | None, *, max_seqs: int, max_num_batched_tokens: int,
                 state_slots: StateSlots | None = None) -> None:
        self.pool = pool  # None: no KV cache, every step recomputes whole sequences
        self.state_slots = state_slots  # None: the model keeps no recurrent state
        self.max_seqs = max_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------
    def schedule(self) -> list[Scheduled]:
        if self.pool is None:
            return self._schedule_without_cache()
        budget = self.budget
        out: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = chunk_size(seq, budget)
            if not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                continue  # retry `seq` (unless it was the victim: then the loop moves on)
            out.append(Scheduled(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs and not preempted:
            if self.state_slots is not None and not self.state_slots.num_free():
                break
            seq = self.waiting[0]
            cached = self._admit_prefix(seq)
            n = chunk_size(seq, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._release(seq)  # give back the cached blocks; wait for memory
                break
            self.waiting.popleft()
            if self.state_slots is not None:
                seq.state_slot = self.state_slots.allocate()
            seq.status = Status.RUNNING
            seq.cached_tokens = cached
            self.running.append(seq)
            out.append(Scheduled(seq, n))
            budget -= n
        return out

    def _schedule_without_cache(self) -> list[Scheduled]:
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        out: list[Scheduled] = []
        budget = self.budget
        for seq in self.running:
            seq.num_computed = 0
            n = len(seq)
            if out and n > budget:
                break
            out.append(Scheduled(seq, n))
            budget -= n
        return out

    def _admit_prefix(self, seq: Sequence) -> int:
        """Reuse cached full blocks of the prompt; the last token is always recomputed so the
        step has logits to sample from."""
        assert self.pool is not None
        if seq.num_computed or not self.pool.enabled:
            return 0
        bs = self.pool.block_size
        extra = getattr(seq.request, "cache_key", None)
        seq.hashes = block_hashes(hash_tokens(seq.tokens, getattr(seq.request, "mm", ())), bs, extra)
        usable = (len(seq) - 1) // bs
        blocks = self.pool.lookup(seq.hashes[:usable])
        if blocks:
            self.pool.acquire_cached(blocks, len(blocks) * bs)
        seq.blocks = list(blocks)
        seq.num_computed = len(blocks) * bs
        return seq.num_computed

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        assert self.pool is not None
        need = self.pool.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        try:
            seq.blocks.extend(self.pool.allocate(need))
        except NoFreeBlocks:
            return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if self.pool is not None and seq.blocks:
            self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.registered_blocks = 0
        if self.state_slots is not None and seq.state_slot is not None:
            self.state_slots.release(seq.state_slot)
        seq.state_slot = None

    # -- after a step -----------------------------------------------------------------------
    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish newly filled blocks to the prefix cache."""
        pool = self.pool
        if pool is None or not pool.enabled:
            return
        bs = pool.block_size
        full = seq.num_computed // bs
        if len(seq.hashes) < full:
            tokens = hash_tokens(seq.tokens[: full * bs], getattr(seq.request, "mm", ()))
            seq.hashes = block_hashes(tokens, bs, getattr(seq.request, "cache_key", None))
        for k in range(seq.registered_blocks, full):
            if pool.block_hash[seq.blocks[k]] is None:
                pool.register_full_block(seq.blocks[k], seq.hashes[k])
        seq.registered_blocks = max(seq.registered_blocks, full)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished, cancelled or failed) and free its blocks."""
        seq.finish_reason = seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.pool is not None and seq.blocks:
            self.register_full_blocks(seq)
            self.pool.retain_prefix(seq.hashes[: seq.num_computed // self.pool.block_size])
        self._release(seq)
        seq.status = Status.FINISHED

    def clear(self) -> list[Sequence]:
        """Drop everything (engine recovery); returns the sequences that were in flight."""
        seqs = list(self.running) + list(self.waiting)
        self.running.clear()
        self.waiting.clear()
        if self.pool is not None:
            self.pool.reset()
        if self.state_slots is not None:
            self.state_slots.reset()
        for seq in seqs:
            seq.blocks, seq.num_computed, seq.hashes, seq.state_slot = [], 0, [], None
            seq.status = Status.FINISHED
        return seqs
