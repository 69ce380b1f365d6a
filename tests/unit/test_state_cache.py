"""The recurrent-state cache (the second cache kind), without a model: slots handed out on
admission and taken back on finish and preemption, reads that start fresh sequences at zero,
writes per slot, and the recurrent references' chunked and step forms agreeing."""

from __future__ import annotations

import pytest
import torch

from mistralrs.attention import AttentionBackend, KVCacheShape
from mistralrs.engine.kv_cache import BlockPool, StateSlots
from mistralrs.engine.scheduler import Scheduler
from mistralrs.nn import recurrent
from mistralrs.state_cache import RecurrentStateShape
from tests.unit.test_scheduler import run_step, seq

SHAPE = {"num_layers": 2, "states": {"conv": (3, 2), "ssm": (2, 4, 5)}, "float32": ("ssm",)}


def backend(num_slots: int = 4, num_blocks: int = 8) -> AttentionBackend:
    rec = RecurrentStateShape.from_model(SHAPE, num_slots=num_slots, dtype=torch.bfloat16)
    return AttentionBackend(KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=num_blocks,
                                         block_size=4, dtype=torch.bfloat16, recurrent=rec))


def test_shape_dtypes_and_bytes():
    rec = RecurrentStateShape.from_model(SHAPE, dtype=torch.bfloat16)
    assert rec.dtype_of("conv") == torch.bfloat16 and rec.dtype_of("ssm") == torch.float32
    assert rec.bytes_per_sequence() == 2 * (3 * 2 * 2 + 2 * 4 * 5 * 4)


def test_read_is_zero_for_an_empty_context_and_the_slot_otherwise():
    b = backend()
    states = b.states
    assert states is not None and states.tensors[1]["ssm"].shape == (4, 2, 4, 5)
    batch = b.batch([0, 3, 4], [3, 9], state_slots=torch.tensor([2, 0]))  # seq 0 fresh, seq 1 decoding
    values = {"conv": torch.ones(2, 3, 2), "ssm": torch.full((2, 2, 4, 5), 2.0)}
    b.write_state(1, batch, values)
    assert torch.equal(states.tensors[1]["ssm"][2], torch.full((2, 4, 5), 2.0))
    assert states.tensors[1]["conv"].dtype == torch.bfloat16
    later = b.batch([0, 5, 6], [5, 10], state_slots=torch.tensor([2, 0]))  # slot 2 reused by a new prompt
    got = b.read_state(1, later)
    assert not got["ssm"][0].any() and torch.equal(got["ssm"][1], torch.full((2, 4, 5), 2.0))


def test_without_slots_states_start_at_zero_and_cached_context_is_refused():
    b = backend(num_blocks=0)
    assert b.states is None
    got = b.read_state(0, b.batch([0, 2], [2]))
    assert got["conv"].shape == (1, 3, 2) and not got["conv"].any()
    with pytest.raises(ValueError, match="state slots"):
        b.read_state(0, b.batch([0, 1], [5]))


def test_scheduler_hands_out_slots_on_admission_and_takes_them_back():
    slots = StateSlots(2)
    s = Scheduler(BlockPool(16, 4, prefix_cache_n=0), max_seqs=4, max_num_batched_tokens=64, state_slots=slots)
    a, b, c = seq(5), seq(5, 100), seq(5, 200)
    for x in (a, b, c):
        s.add(x)
    run_step(s)
    assert {a.state_slot, b.state_slot} == {0, 1} and c.state_slot is None  # c waits for a slot
    assert c in s.waiting and slots.num_free() == 0
    s.finish(a, "stop")
    assert a.state_slot is None and slots.num_free() == 1
    run_step(s)
    assert c.state_slot is not None
    s._preempt(b)  # a preempted sequence gives its slot back and restarts from zero
    assert b.state_slot is None and b.num_computed == 0 and slots.num_free() == 1
    s.clear()
    assert slots.num_free() == 2


def _decay_case(n: int, *, gen: torch.Generator):
    q, k = torch.randn(n, 2, 8, generator=gen), torch.randn(n, 2, 8, generator=gen)
    v = torch.randn(n, 4, 8, generator=gen)
    return q, k, v, -torch.rand(n, 4, generator=gen), torch.rand(n, 4, generator=gen)


def test_chunked_and_step_forms_agree_and_chunks_chain():
    """The chunked forms from a carried state equal running the step form token by token, and a
    sequence split in two chunks equals it whole (what chunked prefill relies on)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g, beta = _decay_case(20, gen=gen)
    whole, s_whole = recurrent.gated_delta_chunked(q, k, v, g, beta, torch.zeros(1, 4, 8, 8), chunk_size=8)
    first, s1 = recurrent.gated_delta_chunked(q[:11], k[:11], v[:11], g[:11], beta[:11], torch.zeros(1, 4, 8, 8), 8)
    second, s2 = recurrent.gated_delta_chunked(q[11:], k[11:], v[11:], g[11:], beta[11:], s1, 8)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_whole, atol=1e-5, rtol=1e-5)
    s, outs = torch.zeros(1, 4, 8, 8), []
    for t in range(20):
        o, s = recurrent.gated_delta_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], s)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), whole, atol=1e-5, rtol=1e-5)

    x, dt = torch.randn(20, 4, 3, generator=gen), torch.rand(20, 4, generator=gen)
    a, d = -torch.rand(4, generator=gen) - 0.5, torch.randn(4, generator=gen)
    bb, cc = torch.randn(20, 2, 5, generator=gen), torch.randn(20, 2, 5, generator=gen)
    y, st = recurrent.mamba2_chunked(x, dt, a, bb, cc, d, torch.zeros(1, 4, 3, 5), chunk_size=6)
    s, outs = torch.zeros(1, 4, 3, 5), []
    for t in range(20):
        o, s = recurrent.mamba2_step(x[t:t + 1], dt[t:t + 1], a, bb[t:t + 1], cc[t:t + 1], d, s)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, st, atol=1e-5, rtol=1e-5)

    w, bias = torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    xs = torch.randn(9, 3, generator=gen)
    y, state = recurrent.causal_conv1d(xs, torch.zeros(1, 3, 3), w, bias)
    s, outs = torch.zeros(1, 3, 3), []
    for t in range(9):
        o, s = recurrent.causal_conv1d_step(xs[t:t + 1], s, w, bias)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, state)


def test_state_memory_comes_out_of_the_kv_budget():
    from mistralrs.serving import ServiceOptions, kv_cache_blocks

    opts = ServiceOptions(model_id="m", pa_memory_mb=1, pa_blk_size=8)
    assert kv_cache_blocks(opts, bytes_per_block=1024, device="cpu", max_model_len=64) == 1024
    assert kv_cache_blocks(opts, bytes_per_block=1024, device="cpu", max_model_len=64, reserved_bytes=256 * 1024) == 768
