"""The reference SDPA backend against a naive attention, with and without a paged cache."""

from __future__ import annotations

import math

import pytest
import torch

from mistralrs.attention import KVCacheShape
from mistralrs_plugins.attention.sdpa.backend import SdpaBackend


def naive(q, k, v, *, scale, window=None, softcap=None):
    """q[L,Hq,D], k/v[S,Hk,D] with the L queries at the last L positions; causal."""
    L, S = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k.double()) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    qpos = torch.arange(S - L, S)[:, None]
    kpos = torch.arange(S)[None]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 30.0)])
def test_prefill_without_cache_matches_naive(window, softcap):
    torch.manual_seed(0)
    backend = SdpaBackend(KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=16, dtype=torch.float32))
    lens = [7, 3, 12]
    q, k, v = torch.randn(sum(lens), 4, 16), torch.randn(sum(lens), 2, 16), torch.randn(sum(lens), 2, 16)
    starts = [0, 7, 10, 22]
    batch = backend.batch(starts, lens)
    out = backend.attend(0, q, k, v, batch, scale=1 / math.sqrt(16), sliding_window=window, softcap=softcap)
    for i in range(3):
        s, e = starts[i], starts[i + 1]
        ref = naive(q[s:e], k[s:e], v[s:e], scale=1 / math.sqrt(16), window=window, softcap=softcap)
        torch.testing.assert_close(out[s:e], ref, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_and_decode_through_paged_cache_match_full_attention():
    torch.manual_seed(1)
    bs = 4
    backend = SdpaBackend(KVCacheShape(num_layers=2, num_kv_heads=1, head_dim=8, num_blocks=16, block_size=bs,
                                       dtype=torch.float32))
    total = 11
    q, k, v = torch.randn(total, 2, 8), torch.randn(total, 1, 8), torch.randn(total, 1, 8)
    table = torch.tensor([[9, 2, 14]], dtype=torch.int32)  # deliberately scattered blocks
    outs = []
    done = 0
    for chunk in (5, 4, 1, 1):  # chunked prefill, then decode steps
        pos = torch.arange(done, done + chunk)
        slots = table[0, pos // bs].long() * bs + pos % bs
        batch = backend.batch([0, chunk], [done + chunk], slots, table)
        outs.append(backend.attend(1, q[done:done + chunk], k[done:done + chunk], v[done:done + chunk], batch,
                                   scale=0.3))
        done += chunk
    torch.testing.assert_close(torch.cat(outs), naive(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)
    assert backend.k_cache[0].abs().sum() == 0  # layer 0 untouched


def test_copy_blocks():
    backend = SdpaBackend(KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=3, block_size=2,
                                       dtype=torch.float32))
    backend.k_cache[0][0:2] = 7.0
    backend.copy_blocks([(0, 2)])
    assert backend.k_cache[0][4:6].eq(7.0).all() and backend.k_cache[0][2:4].eq(0).all()


@pytest.mark.parametrize("window", [None, 3])
def test_paged_backend_batched_decode_matches_reference(window):
    from mistralrs_plugins.attention.paged.backend import PagedBackend

    torch.manual_seed(2)
    bs = 4
    shape = KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=32, block_size=bs, dtype=torch.float32)
    ref, paged = SdpaBackend(shape), PagedBackend(shape)
    lens = [5, 9, 2]
    tables = torch.tensor([[3, 7, 0], [1, 2, 5], [9, 0, 0]], dtype=torch.int32)
    # Fill the caches with each sequence's context through a prefill.
    for backend in (ref, paged):
        for i, n in enumerate(lens):
            torch.manual_seed(10 + i)
            k, v, q = torch.randn(n, 2, 8), torch.randn(n, 2, 8), torch.randn(n, 4, 8)
            pos = torch.arange(n)
            slots = tables[i, pos // bs].long() * bs + pos % bs
            backend.attend(0, q, k, v, backend.batch([0, n], [n], slots, tables[i:i + 1]), scale=0.35)
    # One batched decode step.
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    pos = torch.tensor(lens)
    slots = tables[torch.arange(3), pos // bs].long() * bs + pos % bs
    new_lens = [n + 1 for n in lens]
    outs = []
    for backend in (ref, paged):
        batch = backend.batch([0, 1, 2, 3], new_lens, slots, tables)
        outs.append(backend.attend(0, q, k, v, batch, scale=0.35, sliding_window=window))
    assert batch.scratch["paged_decode"][0] is None  # decode-only: the kernel takes the whole batch
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_paged_backend_single_sequence_decode_matches_reference():
    from mistralrs_plugins.attention.paged.backend import PagedBackend

    torch.manual_seed(4)
    shape = KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=8, block_size=4, dtype=torch.float32)
    ref, paged = SdpaBackend(shape), PagedBackend(shape)
    table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
    k, v, q = torch.randn(10, 2, 8), torch.randn(10, 2, 8), torch.randn(10, 4, 8)
    outs = []
    for backend in (ref, paged):
        pos = torch.arange(9)
        backend.attend(0, q[:9], k[:9], v[:9], backend.batch([0, 9], [9], table[0, pos // 4].long() * 4 + pos % 4, table),
                       scale=0.3)
        slot = table[0, 9 // 4].long().view(1) * 4 + 9 % 4
        batch = backend.batch([0, 1], [10], slot, table)
        outs.append(backend.attend(0, q[9:], k[9:], v[9:], batch, scale=0.3))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_paged_backend_mixed_step_matches_reference(softcap):
    """A step with prefill chunks and decode tokens together: decode rows go through the decode
    kernel, prefill rows through the per-sequence path, and all match the reference backend."""
    from mistralrs_plugins.attention.paged.backend import PagedBackend

    torch.manual_seed(5)
    bs = 4
    shape = KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=32, block_size=bs, dtype=torch.float32)
    ref, paged = SdpaBackend(shape), PagedBackend(shape)
    tables = torch.tensor([[3, 7, 0, 11], [1, 2, 5, 12], [9, 4, 6, 13]], dtype=torch.long)
    ctx = [6, 0, 9]  # sequence 1 starts its prefill in the mixed step
    for backend in (ref, paged):
        for i, n in enumerate(ctx):
            if n:
                torch.manual_seed(20 + i)
                k, v, q = torch.randn(n, 2, 8), torch.randn(n, 2, 8), torch.randn(n, 4, 8)
                pos = torch.arange(n)
                backend.attend(0, q, k, v, backend.batch([0, n], [n], tables[i, pos // bs] * bs + pos % bs,
                                                         tables[i:i + 1]), scale=0.35, softcap=softcap)
    new = [1, 5, 1]  # decode, prefill chunk, decode
    qsl = [0, 1, 6, 7]
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, new)])
    seq_index = torch.repeat_interleave(torch.arange(3), torch.tensor(new))
    slots = tables[seq_index, positions // bs] * bs + positions % bs
    torch.manual_seed(6)
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    outs = []
    for backend in (ref, paged):
        batch = backend.batch(qsl, [c + n for c, n in zip(ctx, new)], slots, tables)
        outs.append(backend.attend(0, q, k, v, batch, scale=0.35, softcap=softcap))
    rows, _, _ = batch.scratch["paged_decode"]
    assert rows.tolist() == [0, 6] and batch.scratch["paged_prefill"] == [1]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def _naive_bidirectional(q, k, v, *, scale, lo, hi, window=None):
    """naive() with positions [lo, hi) also seeing each other (within the window on the left)."""
    L, S = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k.double()) * scale
    qpos, kpos = torch.arange(S - L, S)[:, None], torch.arange(S)[None]
    mask = (kpos <= qpos) | ((qpos >= lo) & (qpos < hi) & (kpos >= lo) & (kpos < hi))
    if window:
        mask &= kpos > qpos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v.double()).float()


def test_consecutive_runs_split_at_sequences():
    from mistralrs.attention import consecutive_runs

    assert consecutive_runs(torch.tensor([2, 3, 4, 7, 8, 9, 10]), [0, 9, 12]) == ((2, 5), (7, 9), (9, 11))
    assert consecutive_runs(torch.tensor([], dtype=torch.long), [0, 3]) == ()


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_bidirectional_range_in_a_chunk_after_cached_context(paged, window):
    """Sequence 0 prefills positions 5..11 after 5 cached ones, with positions 7..10 (flat 2..6)
    bidirectional; sequence 1 decodes in the same step. Each matches the naive attention."""
    from mistralrs_plugins.attention.paged.backend import PagedBackend

    torch.manual_seed(3)
    bs = 4
    cls = PagedBackend if paged else SdpaBackend
    backend = cls(KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=16, block_size=bs,
                               dtype=torch.float32))
    table = torch.tensor([[3, 9, 1, 0], [5, 6, 0, 0]], dtype=torch.int32)
    q0, k0, v0 = torch.randn(12, 2, 8), torch.randn(12, 1, 8), torch.randn(12, 1, 8)
    q1, k1, v1 = torch.randn(6, 2, 8), torch.randn(6, 1, 8), torch.randn(6, 1, 8)

    def slots(seq, pos):
        pos = torch.as_tensor(pos)
        return table[seq, pos // bs].long() * bs + pos % bs

    # cached context: sequence 0's first 5 tokens, sequence 1's first 5
    backend.attend(0, torch.cat([q0[:5], q1[:5]]), torch.cat([k0[:5], k1[:5]]), torch.cat([v0[:5], v1[:5]]),
                   backend.batch([0, 5, 10], [5, 5], torch.cat([slots(0, range(5)), slots(1, range(5))]), table),
                   scale=0.3)
    batch = backend.batch([0, 7, 8], [12, 6], torch.cat([slots(0, range(5, 12)), slots(1, [5])]), table)
    batch = batch.with_bidirectional(((2, 6),))
    out = backend.attend(0, torch.cat([q0[5:], q1[5:]]), torch.cat([k0[5:], k1[5:]]), torch.cat([v0[5:], v1[5:]]),
                         batch, scale=0.3, sliding_window=window)
    ref0 = _naive_bidirectional(q0[5:], k0, v0, scale=0.3, lo=7, hi=11, window=window)
    torch.testing.assert_close(out[:7], ref0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[7:], naive(q1[5:], k1, v1, scale=0.3, window=window), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref0, naive(q0[5:], k0, v0, scale=0.3, window=window), atol=1e-3)


def test_bidirectional_ranges_without_cache():
    torch.manual_seed(4)
    backend = SdpaBackend(KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=16, dtype=torch.float32))
    q, k, v = torch.randn(14, 4, 16), torch.randn(14, 2, 16), torch.randn(14, 2, 16)
    batch = backend.batch([0, 6, 14], [6, 8]).with_bidirectional(((1, 4), (9, 13)))
    out = backend.attend(0, q, k, v, batch, scale=0.25)
    torch.testing.assert_close(out[:6], _naive_bidirectional(q[:6], k[:6], v[:6], scale=0.25, lo=1, hi=4),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[6:], _naive_bidirectional(q[6:], k[6:], v[6:], scale=0.25, lo=3, hi=7),
                               atol=1e-5, rtol=1e-5)


def run_prefill_then_mixed(backend, *, window=None, softcap=None, sinks=None, seed=11):
    """Two steps through `backend`: a prefill-only step (two prompts), then a mixed one (a decode token, a
    second chunk over cached context, a new prompt's first chunk). Returns both steps' outputs and batches."""
    bs = 4
    tables = torch.tensor([[3, 7, 0, 11, 14], [1, 2, 5, 12, 15], [9, 4, 6, 13, 10]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    outs, batches = [], []
    for ctx, new in (([0, 0, 0], [6, 9, 0]), ([6, 9, 0], [1, 5, 7])):
        qsl = [0]
        for n in new:
            qsl.append(qsl[-1] + n)
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, new)])
        seq_index = torch.repeat_interleave(torch.arange(3), torch.tensor(new))
        slots = tables[seq_index, positions // bs] * bs + positions % bs
        t = qsl[-1]
        q, k, v = torch.randn(t, 4, 8, generator=g), torch.randn(t, 2, 8, generator=g), torch.randn(t, 2, 8, generator=g)
        keep = [i for i, n in enumerate(new) if n]
        lens = [ctx[i] + new[i] for i in keep]
        batch = backend.batch([qsl[i] for i in keep] + [t], lens, slots, tables[keep])
        outs.append(backend.attend(0, q, k, v, batch, scale=0.35, sliding_window=window, softcap=softcap,
                                   sinks=sinks))
        batches.append(batch)
    return outs, batches


@pytest.mark.parametrize("window,softcap", [(None, None), (5, 20.0)])
def test_paged_backend_native_prefill_matches_reference(window, softcap):
    """On AVX-512-BF16 CPUs the paged backend's prefill chunks go through cpu_native's kernel (rows of the decode
    kernel), in prefill-only and mixed steps, and match the reference backend."""
    from mistralrs_plugins.attention.paged.backend import PagedBackend
    from mistralrs_plugins.kernels import cpu_native

    if not cpu_native.supports_avx512_bf16():
        pytest.skip("no avx512_bf16 (or native kernels disabled)")
    shape = KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=32, block_size=4, dtype=torch.float32)
    paged = PagedBackend(shape)
    assert paged.prefill_kernel is not None
    want, _ = run_prefill_then_mixed(SdpaBackend(shape), window=window, softcap=softcap)
    got, _ = run_prefill_then_mixed(paged, window=window, softcap=softcap)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap,sinks", [(None, None, False), (5, 20.0, True)])
def test_paged_backend_prefill_kernel_matches_reference(window, softcap, sinks):
    """With a prefill kernel selected (Triton on cuda; here the op's torch reference stands in), prefill
    chunks go through it, in prefill-only and mixed steps, and match the reference backend."""
    from mistralrs.nn import torch_ops
    from mistralrs_plugins.attention.paged.backend import PagedBackend

    shape = KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=32, block_size=4, dtype=torch.float32)
    paged = PagedBackend(shape)
    # On CPU cpu_native's kernels claim the op (AVX-512-BF16 machines, or its AVX2 library on AVX2 ones);
    # otherwise the per-sequence path.
    from mistralrs_plugins.kernels import cpu_native
    from mistralrs_plugins.kernels.cpu_native import ops as native_ops

    expected = (native_ops.paged_attention_prefill if cpu_native.supports_avx512_bf16()
                else native_ops.paged_attention_prefill_avx2 if cpu_native.supports_avx2_only() else None)
    assert paged.prefill_kernel is expected
    calls = []
    paged.prefill_kernel = lambda *a, **kw: calls.append(len(a[5]) - 1) or torch_ops.paged_attention_prefill(*a, **kw)
    s = torch.randn(4) if sinks else None
    want, _ = run_prefill_then_mixed(SdpaBackend(shape), window=window, softcap=softcap, sinks=s)
    got, batches = run_prefill_then_mixed(paged, window=window, softcap=softcap, sinks=s)
    assert calls == [2, 2]  # both prompts in one call; then the chunk and the new prompt, the decode row apart
    assert batches[1].scratch["paged_decode"][0].tolist() == [0]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
