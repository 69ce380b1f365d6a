"""The block pool: hands out KV-cache block ids, shares full blocks between sequences with
the same prefix (prefix caching), and evicts cached prefixes LRU.

The attention backend owns the memory and its layout; this only does the bookkeeping.
A full block is identified by a chained hash of (parent block's hash, its tokens, extra
key) — the extra key carries anything else that changes the KV (adapters, images).
Blocks are ref-counted; a block whose count drops to 0 keeps its hash and content and can be
revived by a later request until it is evicted (LRU) or reused for something else.
`prefix_cache_n` bounds how many finished prefixes are retained (0 disables caching).

`StateSlots` is the same bookkeeping for the second cache kind (models with recurrent layers):
one recurrent-state slot per running sequence (`mistralrs.state_cache`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable, Iterable, Sequence


def block_hashes(tokens: Sequence[int], block_size: int, extra: Hashable = None) -> list[int]:
    """Chained hashes of every *full* block of `tokens`."""
    out: list[int] = []
    parent: int = hash(("mistralrs-root", extra))
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        out.append(parent)
    return out


class NoFreeBlocks(Exception):
    """Raised internally when the pool cannot satisfy an allocation."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache_n: int = 16) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache_n = prefix_cache_n
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        # Blocks with ref 0: plain free ones first, then cached ones in LRU order.
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        # Retained prefixes (LRU): key -> hashes of the blocks of one finished sequence.
        self.retained: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.hits = 0  # cached tokens reused, for metrics
        self.queries = 0

    @property
    def enabled(self) -> bool:
        return self.prefix_cache_n > 0

    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        return self.num_blocks - self.num_free()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------
    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """Blocks holding the longest cached prefix (not yet referenced by the caller)."""
        found = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def acquire_cached(self, blocks: list[int], num_tokens: int) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.evictable.pop(b, None)
            self.ref[b] += 1
        self.queries += 1
        self.hits += num_tokens

    def register_full_block(self, block: int, h: int) -> int:
        """Record that `block` now holds the full block with hash `h`. If another block already
        holds it, keep that one as the canonical copy (this one stays private)."""
        if not self.enabled:
            return block
        if h not in self.by_hash:
            self.by_hash[h] = block
            self.block_hash[block] = h
        return block

    def retain_prefix(self, hashes: Sequence[int]) -> None:
        """Keep a finished sequence's full blocks findable (LRU over prefix_cache_n prefixes)."""
        if not self.enabled or not hashes:
            return
        key = hashes[-1]
        self.retained.pop(key, None)
        self.retained[key] = tuple(hashes)
        while len(self.retained) > self.prefix_cache_n:
            _, dropped = self.retained.popitem(last=False)
            still = {h for chain in self.retained.values() for h in chain}
            for h in dropped:
                if h in still:
                    continue
                block = self.by_hash.get(h)
                if block is not None and self.ref[block] == 0:
                    self._forget(block)
                    self.evictable.pop(block, None)
                    self.free.append(block)

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None and self.by_hash.get(h) == block:
            del self.by_hash[h]
        self.block_hash[block] = None

    # -- allocation -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free():
            raise NoFreeBlocks(n)
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)  # least recently used
                self._forget(block)
            self.ref[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.block_hash[b] is not None and self.enabled:
                    self.evictable[b] = None
                    self.evictable.move_to_end(b)
                else:
                    self.block_hash[b] = None
                    self.free.append(b)

    def reset(self) -> None:
        self.__init__(self.num_blocks, self.block_size, self.prefix_cache_n)  # type: ignore[misc]


class StateSlots:
    """Free recurrent-state slots (the backend's `RecurrentStateCache` holds the tensors). A
    sequence takes one when it is admitted and gives it back when it finishes or is preempted."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free: deque[int] = deque(range(num_slots))

    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise NoFreeBlocks(1)
        return self.free.popleft()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def reset(self) -> None:
        self.free = deque(range(self.num_slots))
