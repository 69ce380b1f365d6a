"""The AVX2 library of the cpu_native plugin (``decode_ops_avx2.cpp``): rms_norm, silu_and_mul, rotary,
paged_attention_decode and paged_attention_prefill for CPUs with AVX2 but without AVX-512-BF16, against the torch
references on fresh random inputs, batch and thread-count invariance of the attention rows, prefill rows equal to
decode's, registration. The library is built directly
(it runs on any AVX2 CPU), so these tests exercise it on AVX-512 machines too."""

from __future__ import annotations

import pytest
import torch

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels import cpu_native, cpu_quant, native_build
from mistralrs_plugins.kernels.cpu_native import ops

pytestmark = pytest.mark.skipif(not cpu_quant.has_avx2() or native_build.native_disabled(),
                                reason="the AVX2 library needs x86-64 with avx2, fma, f16c (and native kernels on)")


@pytest.fixture(scope="module")
def ext():
    return ops.build_avx2()


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % (2**31) ^ hash(request.node.name) % 1000)


DTYPES = [torch.bfloat16, torch.float32]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-2 if dtype is torch.bfloat16 else 2e-5
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [8, 2048, 13])
def test_rms_norm_and_silu_and_mul(ext, dtype, h, gen):
    x = torch.randn(3, h, generator=gen).to(dtype)
    w = torch.randn(h, generator=gen).to(dtype)
    for offset in (False, True):
        _close(ext.rms_norm(x, w, 1e-5, offset), torch_ops.rms_norm(x, w, 1e-5, offset), dtype)
    g = (torch.randn(2, 2 * h, generator=gen) * 4).to(dtype)
    _close(ext.silu_and_mul(g), torch_ops.silu_and_mul(g), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d,rd", [(64, 64), (72, 24), (128, 64)])
def test_rotary(ext, dtype, interleaved, d, rd, gen):
    x = torch.randn(5, 3, d, generator=gen).to(dtype)
    cos, sin = torch.randn(5, rd // 2, generator=gen), torch.randn(5, rd // 2, generator=gen)
    _close(ext.rotary(x, cos, sin, rd, interleaved), torch_ops.rotary(x, cos, sin, rd, interleaved), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_sized_per_token_ops_run_rows_in_parallel_with_the_same_bits(ext, dtype, gen):
    """Prefill-sized inputs go over the pool by rows: each row is what it is alone, on any thread count."""
    x = torch.randn(300, 2048, generator=gen).to(dtype)
    w = torch.randn(2048, generator=gen).to(dtype)
    g = (torch.randn(300, 2 * 1024, generator=gen) * 4).to(dtype)
    q = torch.randn(300, 16, 64, generator=gen).to(dtype)
    cos, sin = torch.randn(300, 32, generator=gen), torch.randn(300, 32, generator=gen)
    calls = [lambda: ext.rms_norm(x, w, 1e-5, False), lambda: ext.silu_and_mul(g),
             lambda: ext.rotary(q, cos, sin, 64, False)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = [call() for call in calls]
        torch.set_num_threads(1)
        one = [call() for call in calls]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(many[0][7:8], ext.rms_norm(x[7:8], w, 1e-5, False))
    assert torch.equal(many[1][7:8], ext.silu_and_mul(g[7:8]))
    assert torch.equal(many[2][7:8], ext.rotary(q[7:8], cos[7:8], sin[7:8], 64, False))
    _close(many[0], torch_ops.rms_norm(x, w, 1e-5, False), dtype)
    _close(many[1], torch_ops.silu_and_mul(g), dtype)
    _close(many[2], torch_ops.rotary(q, cos, sin, 64, False), dtype)


def _attention_case(dtype, gen, d=64, dv=64, hq=8, hk=2, bs=16, lens=(1, 17, 80, 300), blocks=64, width=20):
    slots = blocks * bs
    kc = torch.randn(slots, hk, d, generator=gen).to(dtype)
    vc = torch.randn(slots, hk, dv, generator=gen).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in lens]).to(torch.int32)
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32), bs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (33, None), (None, 20.0)])
@pytest.mark.parametrize("d,dv,hq,hk", [(64, 64, 8, 2), (72, 40, 6, 3), (128, 128, 4, 4), (16, 24, 10, 2)])
def test_paged_attention_decode_matches_the_reference(ext, dtype, window, softcap, d, dv, hq, hk, gen):
    q, kc, vc, tables, lens, bs = _attention_case(dtype, gen, d, dv, hq, hk)
    got = ext.paged_attention_decode(q, kc, vc, tables, lens, bs, d ** -0.5, window or 0, softcap or 0.0)
    want = torch_ops.paged_attention_decode(q, kc, vc, tables, lens, bs, d ** -0.5, window, softcap)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 100, 600])
def test_long_contexts_over_several_key_chunks(ext, dtype, window, gen):
    # The kernel works on chunks of 256 key positions and combines them: contexts of several chunks, windows
    # that start inside a chunk and span a boundary.
    q, kc, vc, tables, lens, bs = _attention_case(dtype, gen, lens=(257, 700, 1100, 513), blocks=96, width=72)
    got = ext.paged_attention_decode(q, kc, vc, tables, lens, bs, 0.125, window or 0, 0.0)
    want = torch_ops.paged_attention_decode(q, kc, vc, tables, lens, bs, 0.125, window, None)
    _close(got, want, dtype)


def _prefill_case(dtype, gen, seqs, d=64, dv=64, hq=8, hk=2, bs=16):
    """Sequences of (seq_len, new tokens) over one cache: q for the new tokens, tables, lens, query_start_loc."""
    width = max(-(-sl // bs) for sl, _ in seqs)
    q, kc, vc, tables, _, bs = _attention_case(dtype, gen, d, dv, hq, hk, bs, lens=[sl for sl, _ in seqs],
                                               blocks=len(seqs) * width + 4, width=width)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], hq, d, generator=gen).to(dtype)
    return q, kc, vc, tables, torch.tensor([sl for sl, _ in seqs]), torch.tensor(starts), bs


PREFILL_SEQS = [(37, 37), (300, 40), (5, 5), (600, 600)]  # whole prompts, a chunk over cached context


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (100, None), (None, 20.0)])
@pytest.mark.parametrize("d,dv,hq,hk", [(64, 64, 8, 2), (72, 40, 6, 3)])
def test_paged_attention_prefill_matches_the_reference(ext, dtype, window, softcap, d, dv, hq, hk, gen):
    q, kc, vc, tables, lens, starts, bs = _prefill_case(dtype, gen, PREFILL_SEQS, d, dv, hq, hk)
    got = ext.paged_attention_prefill(q, kc, vc, tables, lens, starts, bs, d ** -0.5, window or 0, softcap or 0.0)
    want = torch_ops.paged_attention_prefill(q, kc, vc, tables, lens, starts, bs, d ** -0.5, window, softcap)
    _close(got, want, dtype)


@pytest.mark.parametrize("window", [None, 100, 290])
def test_prefill_rows_are_what_decode_gives_them(ext, window, gen):
    """Each new token's attention is bit-identical to decode's for that token, however its prompt is chunked
    or batched (windows that start inside a chunk of keys included)."""
    q, kc, vc, tables, lens, starts, bs = _prefill_case(torch.bfloat16, gen, PREFILL_SEQS)
    out = ext.paged_attention_prefill(q, kc, vc, tables, lens, starts, bs, 0.125, window or 0, 0.0)
    for i, (sl, n) in enumerate(PREFILL_SEQS):
        rows = torch.arange(int(starts[i]), int(starts[i + 1]))
        alone = ext.paged_attention_decode(q[rows], kc, vc, tables[i].expand(n, -1), torch.arange(sl - n + 1, sl + 1),
                                           bs, 0.125, window or 0, 0.0)
        assert torch.equal(out[rows], alone)
    # the last prompt as two chunks: its first 270 tokens, then 330 more over them
    i0 = int(starts[3])
    first = ext.paged_attention_prefill(q[i0:i0 + 270], kc, vc, tables[3:], torch.tensor([270]),
                                        torch.tensor([0, 270]), bs, 0.125, window or 0, 0.0)
    second = ext.paged_attention_prefill(q[i0 + 270:i0 + 600], kc, vc, tables[3:], torch.tensor([600]),
                                         torch.tensor([0, 330]), bs, 0.125, window or 0, 0.0)
    assert torch.equal(torch.cat([first, second]), out[i0:i0 + 600])


def test_attention_rows_do_not_depend_on_the_batch_or_threads(ext, gen):
    q, kc, vc, tables, lens, bs = _attention_case(torch.bfloat16, gen, lens=(5, 200, 90, 300, 31, 64, 1000),
                                                  blocks=96, width=72)
    full = ext.paged_attention_decode(q, kc, vc, tables, lens, bs, 0.125, 0, 0.0)
    for i in range(q.shape[0]):
        one = ext.paged_attention_decode(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], bs, 0.125, 0, 0.0)
        assert torch.equal(one, full[i:i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ext.paged_attention_decode(q, kc, vc, tables, lens, bs, 0.125, 0, 0.0), full)
    finally:
        torch.set_num_threads(threads)


def test_bad_tables_are_errors_not_reads_out_of_bounds(ext, gen):
    q, kc, vc, tables, lens, bs = _attention_case(torch.float32, gen)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.paged_attention_decode(q, kc, vc, tables + 1000, lens, bs, 0.125, 0, 0.0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        ext.paged_attention_decode(q, kc, vc, tables[:, :1], lens, bs, 0.125, 0, 0.0)


def test_registered_for_avx2_cpus_without_avx512_bf16(monkeypatch):
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    specs = []
    cpu_native.register_kernels(specs.append)
    avx2 = [s for s in specs if s.name == "avx2"]
    assert [s.op for s in avx2] == ["rms_norm", "silu_and_mul", "rotary", "paged_attention_decode",
                                   "paged_attention_prefill"]
    for spec in avx2:
        assert spec.priority == cpu_native.AVX2_PRIORITY and 0 < spec.priority < 10
        assert spec.impl == f"mistralrs_plugins.kernels.cpu_native.ops:{spec.op}_avx2"
        assert spec.is_supported(device="cpu") == (cpu_quant.has_avx2() and not cpu_native.has_avx512_bf16())
        assert not spec.is_supported(device="cuda")
    monkeypatch.setattr(cpu_native, "has_avx512_bf16", lambda: True)
    assert not any(spec.is_supported(device="cpu") for spec in avx2)


def test_wrappers_fall_back_to_the_reference_for_what_the_kernel_does_not_take(gen):
    """fp8-like caches, sinks, fp16: the reference (so the op never fails because of the native path)."""
    q, kc, vc, tables, lens, bs = _attention_case(torch.float32, gen)
    sinks = torch.randn(q.shape[1], generator=gen)
    got = ops.paged_attention_decode_avx2(q, kc, vc, tables, lens, bs, 0.125, sinks=sinks)
    assert torch.equal(got, torch_ops.paged_attention_decode(q, kc, vc, tables, lens, bs, 0.125, sinks=sinks))
    x = torch.randn(2, 64, generator=gen).half()
    assert torch.equal(ops.rms_norm_avx2(x, torch.ones(64).half(), 1e-5), torch_ops.rms_norm(x, torch.ones(64).half(), 1e-5))
