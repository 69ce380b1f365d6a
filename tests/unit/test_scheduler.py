"""Block pool, prefix hashing and scheduling, without a model."""

from __future__ import annotations

import pytest

from mistralrs.engine.kv_cache import BlockPool, NoFreeBlocks, block_hashes
from mistralrs.engine.scheduler import Scheduler
from mistralrs.engine.sequence import Sequence, Status


class Req:
    cache_key = None


def seq(n: int, start: int = 0) -> Sequence:
    return Sequence(request=Req(), prompt_ids=list(range(start, start + n)))


def run_step(s: Scheduler):
    """Pretend the model ran: advance computed tokens, 'sample' token 7 where due."""
    step = s.schedule()
    for item in step:
        item.seq.num_computed += item.num_tokens
        s.register_full_blocks(item.seq)
    for item in step:
        if item.seq.num_computed == len(item.seq):
            item.seq.output_ids.append(7)
    return step


def test_block_hashes_are_chained():
    a = block_hashes([1, 2, 3, 4, 5], 2)
    b = block_hashes([9, 2, 3, 4, 5], 2)
    assert len(a) == 2  # only full blocks
    assert a[0] != b[0] and a[1] != b[1]  # same tokens in block 2, different parent
    assert block_hashes([1, 2, 3, 4], 2, extra="lora-a") != block_hashes([1, 2, 3, 4], 2)


def test_pool_allocate_release_and_exhaustion():
    pool = BlockPool(4, 2, prefix_cache_n=0)
    got = pool.allocate(3)
    assert len(set(got)) == 3 and pool.num_free() == 1
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    pool.release(got)
    assert pool.num_free() == 4


def test_prefix_blocks_are_reused_then_evicted_lru():
    pool = BlockPool(4, 2, prefix_cache_n=1)
    hs = block_hashes([1, 2, 3, 4], 2)
    blocks = pool.allocate(2)
    for b, h in zip(blocks, hs):
        pool.register_full_block(b, h)
    pool.release(blocks)
    pool.retain_prefix(hs)
    assert pool.lookup(hs) == blocks and pool.num_free() == 4  # cached but evictable
    # Another prefix evicts the first (prefix_cache_n=1).
    hs2 = block_hashes([5, 6], 2)
    b2 = pool.allocate(1)
    pool.register_full_block(b2[0], hs2[0])
    pool.release(b2)
    pool.retain_prefix(hs2)
    assert pool.lookup(hs) == []
    assert pool.lookup(hs2) == b2


def test_allocation_evicts_cached_blocks_when_free_runs_out():
    pool = BlockPool(2, 2, prefix_cache_n=4)
    hs = block_hashes([1, 2, 3, 4], 2)
    blocks = pool.allocate(2)
    for b, h in zip(blocks, hs):
        pool.register_full_block(b, h)
    pool.release(blocks)
    pool.retain_prefix(hs)
    assert pool.allocate(2)  # must evict both
    assert pool.lookup(hs) == []


def test_chunked_prefill_respects_budget_and_decodes_mix_in():
    s = Scheduler(BlockPool(64, 4, 0), max_seqs=4, max_num_batched_tokens=8)
    a, b = seq(10), seq(3, 100)
    s.add(a)
    s.add(b)
    step = run_step(s)
    assert [(x.seq, x.num_tokens) for x in step] == [(a, 8)]
    step = run_step(s)
    assert [(x.seq, x.num_tokens) for x in step] == [(a, 2), (b, 3)]
    assert a.output_ids == [7] and b.output_ids == [7]
    step = run_step(s)
    assert [(x.seq, x.num_tokens) for x in step] == [(a, 1), (b, 1)]


def test_max_seqs_limits_running():
    s = Scheduler(BlockPool(64, 4, 0), max_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(3, i * 10) for i in range(3)]
    for x in seqs:
        s.add(x)
    run_step(s)
    assert s.running == seqs[:2] and list(s.waiting) == seqs[2:]
    s.finish(seqs[0], "stop")
    run_step(s)
    assert s.running == [seqs[1], seqs[2]]


def test_preemption_by_recompute_when_blocks_run_out():
    s = Scheduler(BlockPool(4, 2, 0), max_seqs=4, max_num_batched_tokens=100)
    a, b = seq(3), seq(3, 50)
    s.add(a)
    s.add(b)
    run_step(s)  # 2 blocks each: pool full
    assert a.status is Status.RUNNING and b.status is Status.RUNNING
    run_step(s)  # a needs 1 more token -> slot 4 is in block 2 (has room); b too
    # Now both at 5 tokens -> need a third block each: b (latest) is preempted.
    step = run_step(s)
    assert b.status is Status.WAITING and b.num_computed == 0 and b.blocks == []
    assert [x.seq for x in step] == [a]
    assert s.preemptions == 1 and b.preemptions == 1
    s.finish(a, "stop")
    before = len(b)
    step = run_step(s)
    assert step[0].seq is b and step[0].num_tokens == before  # recomputes everything


def test_prefix_cache_hit_skips_prefill():
    pool = BlockPool(32, 4, prefix_cache_n=4)
    s = Scheduler(pool, max_seqs=4, max_num_batched_tokens=100)
    first = seq(13)
    s.add(first)
    run_step(s)
    s.finish(first, "stop")
    second = Sequence(request=Req(), prompt_ids=list(range(13)) + [99, 98])
    s.add(second)
    step = run_step(s)
    assert second.cached_tokens == 12  # three full blocks of 4
    assert step[0].num_tokens == len(second.prompt_ids) - 12


def test_prompt_that_is_a_full_cached_prefix_still_computes_its_last_token():
    pool = BlockPool(32, 4, prefix_cache_n=4)
    s = Scheduler(pool, max_seqs=4, max_num_batched_tokens=100)
    a = seq(8)
    s.add(a)
    run_step(s)
    s.finish(a, "stop")
    b = seq(8)
    s.add(b)
    step = run_step(s)
    assert b.cached_tokens == 4 and step[0].num_tokens == 4


def test_finish_frees_blocks_and_clear_resets():
    pool = BlockPool(8, 4, prefix_cache_n=0)
    s = Scheduler(pool, max_seqs=4, max_num_batched_tokens=100)
    a = seq(9)
    s.add(a)
    run_step(s)
    assert pool.num_free() == 5
    s.finish(a, "canceled")
    assert pool.num_free() == 8 and a.finish_reason == "canceled" and a.finished
    b = seq(5)
    s.add(b)
    run_step(s)
    assert s.clear() == [b] and pool.num_free() == 8


def test_without_kv_cache_every_step_recomputes_whole_sequences():
    s = Scheduler(None, max_seqs=2, max_num_batched_tokens=100)
    a = seq(5)
    s.add(a)
    step = s.schedule()
    assert step[0].num_tokens == 5
    a.output_ids.append(1)
    step = s.schedule()
    assert step[0].num_tokens == 6 and a.num_computed == 0
