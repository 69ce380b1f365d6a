"""The native ``linear_fp8`` op (kernels/cpu_quant/linear_bf16.cpp, the Fp8W policy): FP8 E4M3 weights with block
scales against the torch reference, every E4M3 value (subnormals included) widened exactly, batch and thread
invariance, fresh random inputs each run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn.kernels import lookup_kernel
from mistralrs_plugins.kernels import cpu_quant
from mistralrs_plugins.kernels.cpu_quant import ops
from mistralrs_plugins.quant.fp8.method import dequantize_blocked, fp8_bits
from mistralrs_plugins.quant.fp8.method import linear_fp8 as reference
from tests.plugins import test_cpu_quant_kernels as cq

requires_avx2 = cq.requires_avx2
native = cq.native  # the extension, built (or loaded from the cache) once per module

# (N, K, block): DeepSeek's 128 x 128 blocks, partial edge blocks, one scale per tensor, small blocks.
CASES = [(40, 256, (128, 128)), (300, 2048, (128, 128)), (37, 160, (96, 160)), (64, 4096, None), (33, 96, (16, 32)),
         (130, 512, (1, 128))]
ROWS = [1, 2, 3, 4, 5, 7, 17]


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
