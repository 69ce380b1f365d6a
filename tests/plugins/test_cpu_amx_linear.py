"""The AMX bf16 linear (kernels/cpu_native/linear_amx.cpp, op ``linear_bf16`` named ``amx_bf16``): the product within
one bf16 rounding (fp32 output: fp32 summation noise) of the exact one, every row the same alone or in any batch and
on any number of threads, shapes it does not take on the AVX-512-BF16 kernel, and its registration."""

from __future__ import annotations

import pytest
import torch

from mistralrs_plugins.kernels import cpu_native
from mistralrs_plugins.kernels.cpu_native import ops
from tests.plugins import test_cpu_native_kernels as tn

requires_amx = pytest.mark.skipif(not cpu_native.has_amx_bf16(), reason="needs a CPU with amx_tile and amx_bf16")
native = tn.native  # the extension, built (or loaded from the cache) once per module

# (N, K): multiples of 32 (the AMX tiles), one and several 32-row blocks of W, K from one slice to 8192.
SHAPES = [(32, 32), (64, 2048), (96, 8192), (2048, 64), (544, 1024)]
ROWS = [1, 2, 15, 16, 17, 31, 32, 33, 64, 100]


@pytest.fixture
def amx(native):
    if not ops.linear_bf16_amx.__module__ or not native.extension().amx_available():
        pytest.skip("the OS does not permit AMX tile data")
    return ops.linear_bf16_amx


@requires_amx
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_the_exact_product(amx, n, k, gen):
    x = torch.randn(max(ROWS), k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    for m in ROWS:
        tn._check(amx(x[:m], w, b), x[:m], w, b)
        tn._check_f32(amx(x[:m], w, b, out_f32=True), x[:m], w, b)


@requires_amx
@pytest.mark.parametrize("out_f32", [False, True])
def test_rows_do_not_depend_on_the_batch_or_threads(amx, out_f32, gen):
    x = torch.randn(150, 1024, generator=gen).to(torch.bfloat16)
    w = (torch.randn(320, 1024, generator=gen) / 32).to(torch.bfloat16)
    full = amx(x, w, out_f32=out_f32)
    for m in (1, 2, 16, 17, 33, 64, 130):
        for start in (0, 150 - m):
            assert torch.equal(amx(x[start:start + m], w, out_f32=out_f32), full[start:start + m]), (m, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(amx(x, w, out_f32=out_f32), full)
    finally:
        torch.set_num_threads(threads)


@requires_amx
def test_shapes_it_does_not_take_are_the_avx512_kernel(amx, gen):
    x = torch.randn(5, 100, generator=gen).to(torch.bfloat16)
    w = torch.randn(40, 100, generator=gen).to(torch.bfloat16)  # K % 32 != 0
    assert torch.equal(amx(x, w), ops.linear_bf16(x, w))
    x3 = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    w3 = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    assert amx(x3, w3).shape == (2, 3, 64)
    tn._check(amx(x3, w3), x3, w3, None)
    xf, wf = x3.float(), w3.float()  # fp32: the reference
    torch.testing.assert_close(amx(xf, wf), torch.nn.functional.linear(xf, wf))


def test_the_registry_picks_amx_where_the_cpu_has_it():
    from mistralrs.nn.kernels import lookup_kernel

    fn = lookup_kernel("linear_bf16", torch.device("cpu"))
    if cpu_native.supports_amx_bf16():
        assert fn is ops.linear_bf16_amx
