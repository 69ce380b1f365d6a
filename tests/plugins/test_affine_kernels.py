"""The affine group layout (quant/affine/layout.py) and the native ``qmatmul_affine`` kernels (AVX2 and AVX-512
VNNI tiles in kernels/cpu_quant): packing is exact, and the kernels compute llama.cpp-style q8_0-activation
products to fp32 rounding, batch- and thread-invariantly, on fresh random inputs each run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn.kernels import lookup_kernel
from mistralrs_plugins.kernels import cpu_quant
from mistralrs_plugins.kernels.cpu_quant import ops
from mistralrs_plugins.quant.affine import layout
from tests.plugins import test_cpu_quant_kernels as cq
from tests.plugins.test_cpu_quant_kernels import ISAS, q8_0_act, randn, requires_avx2

native = cq.native  # the extension, built (or loaded from the cache) once per module

# (bits, group size, K): groups of 32, 64, 128, 256 and one per row; K with and without a partial super-block.
LAYOUTS = [(4, 32, 256), (4, 64, 4096), (4, 128, 2048), (4, 256, 1024), (4, -1, 192), (4, 64, 320),
           (8, 32, 96), (8, 64, 512), (8, 128, 1024), (8, -1, 2048)]
ROWS = [1, 2, 3, 4, 5, 8, 9, 17]


def random_affine(rng: np.random.Generator, n: int, k: int, bits: int, group: int):
    """Random codes and (s, b) per group as AWQ/GPTQ produce them (b = -s * zero): (codes, s, b, dense w)."""
    g = k if group <= 0 else group
    groups = -(-k // g)
    codes = torch.from_numpy(rng.integers(0, 1 << bits, size=(n, k)))
    s = torch.from_numpy(rng.uniform(0.5, 1.0, (n, groups)).astype(np.float32)) / (np.sqrt(k) * (1 << bits))
    zero = torch.from_numpy(rng.integers(0, 1 << bits, size=(n, groups))).float()
    b = -s * zero
    w = codes.float() * s.repeat_interleave(g, 1)[:, :k] + b.repeat_interleave(g, 1)[:, :k]
    return codes, s, b, w


def kernel(isa: str):
    return ops.qmatmul_affine_vnni if isa == "vnni" else ops.qmatmul_affine


def emulate(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' arithmetic done exactly: x as its q8_0 blocks, float64 products. -> (y, magnitude)."""
    qa, da = q8_0_act(x)
    xq = (qa.double() * da.double()[..., None]).reshape(x.shape)
    return xq @ w.double().T, xq.abs() @ w.double().abs().T


@pytest.mark.parametrize("bits,group,k", LAYOUTS)
def test_pack_is_exact_and_unpacks(bits, group, k, rng):
    codes, s, b, w = random_affine(rng, 7, k, bits, group)
    packed, pairs = layout.pack(codes, s, b, bits, group)
    assert packed.dtype == torch.uint8 and packed.shape == (7, layout.row_bytes(k, bits, pairs))
    assert torch.equal(layout.dequantize(packed, k, bits, pairs), w)
    got_codes, _, _ = layout.unpack(packed, k, bits, pairs)
    assert torch.equal(got_codes.long(), codes)


def test_groups_the_layout_cannot_hold_are_refused():
    assert layout.pairs_for(96, 384) is None and layout.pairs_for(48, 96) is None and layout.pairs_for(160, 640) is None
    assert layout.pairs_for(-1, 4096) == 1 and layout.pairs_for(32, 64) == 4 and layout.pairs_for(256, 1024) == 1
    with pytest.raises(ValueError, match="groups of 32, 64 or a multiple of 128"):
        layout.pack(torch.zeros(2, 384, dtype=torch.long), torch.ones(2, 4), torch.zeros(2, 4), 4, 96)


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group,k", LAYOUTS)
def test_matches_the_exact_emulation(native, bits, group, k, isa, rng):
    n = 37
    codes, s, b, w = random_affine(rng, n, k, bits, group)
    packed, pairs = layout.pack(codes, s, b, bits, group)
    x = randn(rng, max(ROWS), k)
    exact, mag = emulate(x, w)
    for m in ROWS:
        y = kernel(isa)(x[:m], packed, bits=bits, pairs=pairs, out_f32=True)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        err = (y.double() - exact[:m]).abs()
        assert bool((err <= 1e-5 * mag[:m] + 1e-30).all()), f"max error / magnitude {(err / mag[:m]).max():.3g}"


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
def test_close_to_the_float_product(native, bits, isa, rng):
    codes, s, b, w = random_affine(rng, 64, 1024, bits, 64)
    packed, pairs = layout.pack(codes, s, b, bits, 64)
    x = randn(rng, 5, 1024)
    y = kernel(isa)(x, packed, bits=bits, pairs=pairs, out_f32=True)
    ref = F.linear(x, w)
    assert float((y - ref).norm() / ref.norm()) < 1e-2


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
def test_rows_do_not_depend_on_the_batch_or_threads(native, bits, isa, rng):
    codes, s, b, w = random_affine(rng, 300, 768, bits, 128)
    packed, pairs = layout.pack(codes, s, b, bits, 128)
    x = randn(rng, 33, 768)
    fn = kernel(isa)
    whole = fn(x, packed, bits=bits, pairs=pairs)
    for m in (1, 2, 5, 9):
        assert torch.equal(fn(x[-m:], packed, bits=bits, pairs=pairs), whole[-m:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fn(x, packed, bits=bits, pairs=pairs), whole)
    finally:
        torch.set_num_threads(threads)


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
def test_bias_dtypes_and_leading_dims(native, isa, rng):
    codes, s, b, w = random_affine(rng, 24, 256, 4, 64)
    packed, pairs = layout.pack(codes, s, b, 4, 64)
    x = randn(rng, 2, 3, 256)
    bias = randn(rng, 24)
    y = kernel(isa)(x.bfloat16(), packed, bias, bits=4, pairs=pairs)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    y32 = kernel(isa)(x, packed, bias, bits=4, pairs=pairs, out_f32=True)
    torch.testing.assert_close(y32 - bias, kernel(isa)(x, packed, bits=4, pairs=pairs, out_f32=True))
    assert float((y32 - F.linear(x, w, bias)).norm() / F.linear(x, w, bias).norm()) < 1e-2


@requires_avx2
def test_what_the_kernel_does_not_take_is_the_reference(native, rng):
    codes, s, b, w = random_affine(rng, 8, 64, 4, 32)
    packed, pairs = layout.pack(codes, s, b, 4, 32)
    x = randn(rng, 3, 64).double()  # float64: not a kernel dtype
    y = ops.qmatmul_affine(x, packed, bits=4, pairs=pairs)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, layout.qmatmul_affine(x, packed, bits=4, pairs=pairs))
    torch.testing.assert_close(y.float(), F.linear(x.float(), w), rtol=1e-5, atol=1e-5)


def test_the_registry_picks_the_native_kernel_where_it_runs():
    fn = lookup_kernel("qmatmul_affine", torch.device("cpu"))
    if cpu_quant.supports_avx512_vnni():
        assert fn is ops.qmatmul_affine_vnni
    elif cpu_quant.supports_avx2():
        assert fn is ops.qmatmul_affine
    else:
        assert fn is layout.qmatmul_affine
