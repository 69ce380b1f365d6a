"""The native widening linears with block scales (kernels/cpu_quant/linear_bf16.cpp): ``linear_fp8`` (FP8 E4M3:
every value, subnormals included, widened exactly), ``linear_int8`` and ``linear_lut4`` (bitsandbytes LLM.int8 and
NF4/FP4) against their torch references, batch and thread invariance, fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn.kernels import lookup_kernel
from mistralrs_plugins.kernels import cpu_quant
from mistralrs_plugins.kernels.cpu_quant import ops
from mistralrs_plugins.quant.bnb import method as bnb
from mistralrs_plugins.quant.fp8.method import dequantize_blocked, fp8_bits
from mistralrs_plugins.quant.fp8.method import linear_fp8 as reference
from tests.plugins import test_cpu_quant_kernels as cq

requires_avx2 = cq.requires_avx2
native = cq.native  # the extension, built (or loaded from the cache) once per module

# (N, K, block): DeepSeek's 128 x 128 blocks, partial edge blocks, one scale per tensor, small blocks.
CASES = [(40, 256, (128, 128)), (300, 2048, (128, 128)), (37, 160, (96, 160)), (64, 4096, None), (33, 96, (16, 32)),
         (130, 512, (1, 128))]
ROWS = [1, 2, 3, 4, 5, 7, 17, 40]  # 16 rows and more: the GEMM widens each panel of W once


def random_fp8(gen: torch.Generator, n: int, k: int, block: tuple[int, int] | None):
    bits = fp8_bits(torch.randn(n, k, generator=gen) * 60)
    if block is None:
        return bits, torch.rand((), generator=gen) * 0.01 + 1e-3
    return bits, torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) * 0.01 + 1e-3


@requires_avx2
@pytest.mark.parametrize("n,k,block", CASES)
def test_matches_the_reference(native, n, k, block, gen):
    bits, scale = random_fp8(gen, n, k, block)
    x = torch.randn(max(ROWS), k, generator=gen)
    want = F.linear(x.double(), dequantize_blocked(bits, scale, block).double())
    mag = F.linear(x.double().abs(), dequantize_blocked(bits, scale, block).double().abs())
    for m in ROWS:
        y = ops.linear_fp8(x[:m], bits, scale, block=block, out_f32=True)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert bool(((y.double() - want[:m]).abs() <= 1e-5 * mag[:m] + 1e-30).all())


@requires_avx2
def test_every_e4m3_value_widens_exactly(native):
    values = torch.arange(256, dtype=torch.uint8)
    values[(values & 0x7F) == 0x7F] = 0  # the two NaN patterns
    y = ops.linear_fp8(torch.eye(256), values.repeat(16, 1), torch.tensor(1.0), out_f32=True)
    assert torch.equal(y[:, 0], values.view(torch.float8_e4m3fn).float())


@requires_avx2
def test_rows_do_not_depend_on_the_batch_or_threads(native, gen):
    bits, scale = random_fp8(gen, 300, 1024, (128, 128))
    x = torch.randn(23, 1024, generator=gen).bfloat16()
    whole = ops.linear_fp8(x, bits, scale, block=(128, 128))
    assert whole.dtype == torch.bfloat16
    for m in (1, 3, 5, 9):
        assert torch.equal(ops.linear_fp8(x[-m:], bits, scale, block=(128, 128)), whole[-m:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.linear_fp8(x, bits, scale, block=(128, 128)), whole)
    finally:
        torch.set_num_threads(threads)


@requires_avx2
def test_bias_and_leading_dims(native, gen):
    bits, scale = random_fp8(gen, 24, 128, (128, 128))
    x = torch.randn(2, 3, 128, generator=gen)
    bias = torch.randn(24, generator=gen)
    y = ops.linear_fp8(x, bits, scale, bias, block=(128, 128))
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, reference(x, bits, scale, bias, block=(128, 128)), rtol=1e-5, atol=1e-5)


@requires_avx2
def test_what_the_kernel_does_not_take_is_the_reference(native, gen):
    bits, scale = random_fp8(gen, 8, 40, None)  # K not a multiple of 16
    x = torch.randn(3, 40, generator=gen)
    torch.testing.assert_close(ops.linear_fp8(x, bits, scale), reference(x, bits, scale))


def test_the_registry_picks_the_native_kernel_where_it_runs():
    fn = lookup_kernel("linear_fp8", torch.device("cpu"))
    assert fn is (ops.linear_fp8 if cpu_quant.supports_avx2() else reference)


# -- linear_int8 and linear_lut4 (bitsandbytes LLM.int8 and NF4/FP4) ------------------------------------------

NF4 = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0, 0.0795803,
                    0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


@requires_avx2
@pytest.mark.parametrize("n,k,blocksize", [(40, 256, 64), (130, 2048, 64), (9, 96, 32), (33, 4096, 4096)])
def test_lut4_matches_the_reference_and_is_batch_invariant(native, n, k, blocksize, gen):
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(n, k // blocksize, generator=gen) * 0.1
    x = torch.randn(max(ROWS), k, generator=gen)
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(n, k).long()
    w = NF4[codes].double() * absmax.double().repeat_interleave(blocksize, 1)
    want = x.double() @ w.T
    ref = bnb.linear_lut4(x, packed, NF4, absmax, block=(1, blocksize), out_f32=True)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-5)
    mag = x.double().abs() @ w.abs().T
    for m in ROWS:
        y = ops.linear_lut4(x[:m], packed, NF4, absmax, block=(1, blocksize), out_f32=True)
        assert bool(((y.double() - want[:m]).abs() <= 1e-5 * mag[:m] + 1e-30).all())
        assert torch.equal(ops.linear_lut4(x[m - 1:m], packed, NF4, absmax, block=(1, blocksize), out_f32=True)[0],
                           y[m - 1])


@requires_avx2
def test_int8_matches_the_reference_and_is_batch_invariant(native, gen):
    n, k = 70, 1024
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=gen) / 127
    x = torch.randn(40, k, generator=gen)
    w = weight.double() * scale.double()
    y = ops.linear_int8(x, weight, scale, block=(1, k), out_f32=True)
    mag = x.double().abs() @ w.abs().T
    want = x.double() @ w.T
    # Both are fp32 sums of 1024 products: each is held to the exact value relative to the sum of |terms|
    # (an element-wise rtol fails on cancelling sums).
    ref = bnb.linear_int8(x, weight, scale, block=(1, k), out_f32=True)
    assert bool(((ref.double() - want).abs() <= 1e-5 * mag).all())
    assert bool(((y.double() - want).abs() <= 1e-5 * mag).all())
    assert torch.equal(ops.linear_int8(x[3:4], weight, scale, block=(1, k), out_f32=True)[0], y[3])


def test_the_registry_picks_the_native_widening_kernels_where_they_run():
    for op, ref in (("linear_int8", bnb.linear_int8), ("linear_lut4", bnb.linear_lut4)):
        fn = lookup_kernel(op, torch.device("cpu"))
        assert fn is (getattr(ops, op) if cpu_quant.supports_avx2() else ref)
