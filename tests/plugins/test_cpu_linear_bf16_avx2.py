"""The AVX2 ``linear_bf16`` kernel of the `cpu_quant` plugin: against ``F.linear`` in fp32, batch and
thread-count invariance (bit-exact), fallbacks to the torch reference, registration below the AVX-512-BF16
kernel of `cpu_native`.

Inputs are fresh random draws on every run: each test's generator is seeded from a per-run seed (printed
with a failure; set ``MISTRALRS_TEST_SEED`` to replay one) and the test's id.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels import cpu_native, cpu_quant
from mistralrs_plugins.kernels.cpu_quant import ops

requires_avx2 = pytest.mark.skipif(not cpu_quant.has_avx2(), reason="the kernel needs x86-64 with avx2, fma, f16c")




def randn(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.fixture(scope="module")
def native():
    """The native ops, built (or loaded from the cache) once for this module."""
    if not cpu_quant.has_avx2():
        pytest.skip("no avx2/fma/f16c")
    if cpu_quant.native_disabled():
        pytest.skip(f"native kernels disabled by {cpu_quant.DISABLE_ENV}")
    saved = (ops._lazy.ext, ops._lazy.failed)
    ops._reset_for_tests()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.NativeKernelWarning)
        try:
            ext = ops.extension()
        except ops.NativeKernelWarning as exc:
            pytest.skip(f"the native build failed: {exc}")
    if ext is None:
        pytest.skip(f"no native build: {ops.status()}")
    yield ext
    if saved[0] is not None:
        ops._lazy.ext, ops._lazy.failed = saved


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def assert_close_to_fp32(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                         out_f32: bool) -> None:
    """fp32 arithmetic in another order: error ~ eps_fp32 * sum |x w| (a generous multiple); a bf16 output
    adds one rounding (half an ulp, 2^-9 relative)."""
    ref = reference(x, w, b)
    assert y.dtype == (torch.float32 if out_f32 else x.dtype)
    assert y.shape == ref.shape
    mag = F.linear(x.float().abs(), w.float().abs()) + (0 if b is None else b.float().abs())
    tol = 1e-5 * mag + 1e-30
    if not out_f32 and x.dtype == torch.bfloat16:
        tol = tol + 2.0**-8 * ref.abs()
    err = (y.float() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


SHAPES = [  # (M, N, K)
    *[(m, n, k) for m in (1, 3, 4, 5, 16, 33) for n, k in ((8, 64), (24, 2048), (2056, 64), (2048, 2048))],
    (512, 2056, 2048),
    (512, 24, 64),
    (1, 24, 8192),
    (5, 2056, 8192),
    (33, 8, 8192),
    (2, 2048, 8192),
]


VARIANTS = [(False, False), (True, True), (True, False), (False, True)]  # (with_bias, out_f32)
CASES = [  # large shapes: two of the four variants are enough
    (*shape, *variant) for shape in SHAPES for variant in VARIANTS
    if variant in VARIANTS[:2] or (shape[0] * shape[1] * shape[2] <= 2**28 and shape[2] != 8192)
]


@requires_avx2
@pytest.mark.parametrize("m,n,k,with_bias,out_f32", CASES)
def test_matches_f_linear_in_fp32(native, m, n, k, with_bias, out_f32, gen):
    x = randn(gen, m, k)
    w = randn(gen, n, k, scale=k**-0.5)
    b = randn(gen, n) if with_bias else None
    assert_close_to_fp32(ops.linear_bf16(x, w, b, out_f32=out_f32), x, w, b, out_f32)


@requires_avx2
@pytest.mark.parametrize("out_f32", [False, True])
def test_fp32_activations_and_bias_dtypes(native, out_f32, gen):
    x = randn(gen, 7, 256, dtype=torch.float32)  # not bf16-representable: used as is in fp32
    w = randn(gen, 40, 256, scale=1 / 16)
    for b in (None, randn(gen, 40), randn(gen, 40, dtype=torch.float32)):
        y = ops.linear_bf16(x, w, b, out_f32=out_f32)
        assert y.dtype == torch.float32
        assert_close_to_fp32(y, x, w, b, True)


@requires_avx2
def test_leading_dims_and_strides(native, gen):
    w = randn(gen, 24, 128, scale=1 / 11)
    b = randn(gen, 24)
    x = randn(gen, 2, 3, 128)
    y = ops.linear_bf16(x, w, b)
    assert y.shape == (2, 3, 24)
    assert torch.equal(y, ops.linear_bf16(x.reshape(6, 128), w, b).view(2, 3, 24))
    wide = randn(gen, 5, 256)
    rows = wide[:, :128]  # rows with a stride of 256
    assert torch.equal(ops.linear_bf16(rows, w, b), ops.linear_bf16(rows.contiguous(), w, b))
    cols = randn(gen, 128, 5).t()  # non-unit stride within rows: copied
    assert torch.equal(ops.linear_bf16(cols, w, b), ops.linear_bf16(cols.contiguous(), w, b))
    empty = ops.linear_bf16(randn(gen, 0, 128), w, b)
    assert empty.shape == (0, 24)


@requires_avx2
@pytest.mark.parametrize("n,k", [(67, 2048), (21, 8192), (2056, 64)])
@pytest.mark.parametrize("out_f32", [False, True])
def test_rows_do_not_depend_on_the_batch(native, n, k, out_f32, gen):
    """A row's output is bit-identical alone (GEMV), in small batches (GEMV with 2-4 rows), in any position
    of a larger batch (GEMM tiles and their tails) and in a 512-row prefill."""
    w = randn(gen, n, k, scale=k**-0.5)
    b = randn(gen, n)
    x = randn(gen, 512, k)
    full = ops.linear_bf16(x, w, b, out_f32=out_f32)
    alone = torch.cat([ops.linear_bf16(x[i:i + 1], w, b, out_f32=out_f32) for i in range(0, 512, 7)])
    assert torch.equal(full[::7], alone)
    for m in (2, 3, 4, 5, 6, 7, 16, 33, 37):
        for start in (0, 7, 512 - m):
            got = ops.linear_bf16(x[start:start + m], w, b, out_f32=out_f32)
            assert torch.equal(got, full[start:start + m]), (m, start)


@requires_avx2
def test_results_do_not_depend_on_the_thread_count(native, gen):
    """Work big enough to be split between threads (GEMV and GEMM) gives the same bits on 1 and 2 threads."""
    w = randn(gen, 1029, 1024, scale=1 / 32)
    x = randn(gen, 40, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ops.linear_bf16(x[:m], w, out_f32=True) for m in (1, 3, 40)]
        torch.set_num_threads(2)
        two = [ops.linear_bf16(x[:m], w, out_f32=True) for m in (1, 3, 40)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(two[0], two[2][:1]) and torch.equal(two[1], two[2][:3])


# -- fallbacks ----------------------------------------------------------------------------------------


def _spy_reference(monkeypatch, calls: list):
    real = torch_ops.linear_bf16

    def ref(x, weight, bias=None, *, out_f32=False):
        calls.append(tuple(x.shape))
        return real(x, weight, bias, out_f32=out_f32)

    monkeypatch.setattr(torch_ops, "linear_bf16", ref)


@requires_avx2
def test_inputs_the_kernel_does_not_take_go_to_the_reference(native, monkeypatch, gen):
    calls: list = []
    _spy_reference(monkeypatch, calls)
    w = randn(gen, 8, 64)
    x = randn(gen, 2, 64)
    cases = [
        (x.half(), w.half(), None),  # fp16
        (x.float(), w.float(), None),  # fp32 weight
        (x, randn(gen, 64, 8).t(), None),  # non-contiguous weight
        (randn(gen, 2, 40), randn(gen, 8, 40), None),  # K not a multiple of 16
        (x.clone().requires_grad_(), w, None),  # autograd
        (x, w.clone().requires_grad_(), None),
        (x.half(), w.half(), randn(gen, 8).half()),
        (x, w, randn(gen, 8).half()),  # fp16 bias
        (x, w, randn(gen, 3)),  # a bias of the wrong size
    ]
    for a, b, c in cases:
        try:
            expected = F.linear(a, b, c)
        except RuntimeError:  # e.g. mixed dtypes, a bias of the wrong size: the reference's error
            with pytest.raises(RuntimeError):
                ops.linear_bf16(a, b, c)
            continue
        torch.testing.assert_close(ops.linear_bf16(a, b, c), expected)
    assert len(calls) == len(cases)
    ops.linear_bf16(x, w)
    ops.linear_bf16(x.float(), w, randn(gen, 8))
    assert len(calls) == len(cases)


def _fresh_state(monkeypatch):
    monkeypatch.setattr(ops._lazy, "ext", None)
    monkeypatch.setattr(ops._lazy, "failed", None)
    monkeypatch.setattr(ops, "has_avx2", lambda: True)  # reach the build on any CPU


def _two_calls_one_warning(monkeypatch, gen) -> str:
    calls: list = []
    _spy_reference(monkeypatch, calls)
    w = randn(gen, 8, 64)
    x = randn(gen, 3, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.linear_bf16(x, w)
        ops.linear_bf16(x, w, out_f32=True)
    native_warnings = [w for w in caught if issubclass(w.category, ops.NativeKernelWarning)]
    assert len(native_warnings) == 1, [str(w.message) for w in caught]
    assert native_warnings[0].filename == __file__  # points at the caller of the op
    assert calls == [(3, 64), (3, 64)]
    assert torch.equal(y, F.linear(x, w))
    return str(native_warnings[0].message)


def test_fallback_when_disabled_by_env(monkeypatch, gen):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(cpu_quant.DISABLE_ENV, "1")
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build when disabled"))
    assert "MISTRALRS_NO_NATIVE_KERNELS" in _two_calls_one_warning(monkeypatch, gen)


def test_fallback_when_the_build_raises(monkeypatch, gen):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)

    def broken():
        raise RuntimeError("Error building extension 'x'\nc++: error: no such compiler")

    monkeypatch.setattr(ops, "_builder", broken)
    assert "no such compiler" in _two_calls_one_warning(monkeypatch, gen)


def test_fallback_on_a_cpu_without_avx2(monkeypatch, gen):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "has_avx2", lambda: False)
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build for a CPU without avx2"))
    assert "avx2" in _two_calls_one_warning(monkeypatch, gen)


# -- registration ---------------------------------------------------------------------------------


def test_registered_between_the_reference_and_avx512(monkeypatch):
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    specs = []
    cpu_quant.register_kernels(specs.append)
    (spec,) = [s for s in specs if s.op == "linear_bf16"]
    assert (spec.name, spec.devices, spec.impl) == ("avx2", ("cpu",), "mistralrs_plugins.kernels.cpu_quant.ops:linear_bf16")
    native_specs = []
    cpu_native.register_kernels(native_specs.append)
    (avx512,) = [s for s in native_specs if s.op == "linear_bf16" and s.name == "avx512_bf16"]
    assert 0 < spec.priority < avx512.priority
    assert not spec.is_supported(device="cuda")
    assert spec.is_supported(device="cpu") == cpu_quant.has_avx2()
    monkeypatch.setenv(cpu_quant.DISABLE_ENV, "1")
    assert not spec.is_supported(device="cpu")


def _registry(monkeypatch):
    from mistralrs.plugins import PluginHost

    host = PluginHost(environ={})
    host.load()
    if "kernels_cpu_quant" not in host.plugins:  # entry point not installed: register by hand
        host.register(cpu_quant, name="kernels_cpu_quant", first_party=True)
    if "kernels_cpu_native" not in host.plugins:
        host.register(cpu_native, name="kernels_cpu_native", first_party=True)
    return host.registry()


def test_registry_picks_avx2_without_avx512_bf16_and_avx512_with_it(monkeypatch):
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cpu_quant, "has_avx2", lambda: True)
    monkeypatch.setattr(cpu_native, "has_avx512_bf16", lambda: False)
    monkeypatch.setattr(cpu_native, "has_amx_bf16", lambda: False)
    registry = _registry(monkeypatch)
    assert registry.kernel("linear_bf16", "cpu").name == "avx2"
    monkeypatch.setattr(cpu_native, "has_avx512_bf16", lambda: True)
    assert registry.kernel("linear_bf16", "cpu").name == "avx512_bf16"
    monkeypatch.setattr(cpu_native, "has_amx_bf16", lambda: True)
    assert registry.kernel("linear_bf16", "cpu").name == "amx_bf16"
    monkeypatch.setattr(cpu_native, "has_amx_bf16", lambda: False)
    monkeypatch.setattr(cpu_native, "has_avx512_bf16", lambda: False)
    monkeypatch.setattr(cpu_quant, "has_avx2", lambda: False)
    assert registry.kernel("linear_bf16", "cpu").reference
