"""The native CPU kernel plugin (`mistralrs_plugins.kernels.cpu_native`): the AVX-512-BF16
`linear_bf16` GEMV against the torch reference, its fallbacks, and its registration."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from mistralrs_plugins.kernels import cpu_native, torch_ops
from mistralrs_plugins.kernels.cpu_native import ops

requires_avx512_bf16 = pytest.mark.skipif(
    not cpu_native.has_avx512_bf16(),
    reason="the native linear_bf16 kernel needs an x86 CPU with avx512_bf16 (not this one)",
)


# -- registration --------------------------------------------------------------------------------


def test_registration_module_does_not_import_torch():
    code = (
        "import sys\n"
        "import mistralrs_plugins.kernels.cpu_native as m\n"
        "specs = []\n"
        "m.register_kernels(specs.append)\n"
        "specs[0].is_supported(device='cpu')\n"
        "assert 'torch' not in sys.modules, 'registration imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_registers_linear_bf16_for_cpu_only(monkeypatch):
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    specs = []
    cpu_native.register_kernels(specs.append)
    (spec,) = specs
    assert (spec.name, spec.op, spec.devices, spec.priority) == ("avx512_bf16", "linear_bf16", ("cpu",), 10)
    assert spec.impl == "mistralrs_plugins.kernels.cpu_native.ops:linear_bf16"
    assert not spec.is_supported(device="cuda")
    assert spec.is_supported(device="cpu") == cpu_native.has_avx512_bf16()
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "1")
    assert not spec.is_supported(device="cpu")
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    assert spec.is_supported(device="cpu") == cpu_native.has_avx512_bf16()


def test_torch_reference_is_registered_and_is_f_linear():
    from mistralrs.plugins import get_registry
    from mistralrs.specs import resolve

    ref = get_registry().reference_kernel("linear_bf16")
    assert resolve(ref.impl) is torch_ops.linear_bf16
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    torch.testing.assert_close(torch_ops.linear_bf16(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


def test_registry_picks_native_kernel_on_avx512_bf16(monkeypatch):
    from mistralrs.plugins import PluginHost

    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    host = PluginHost(environ={})
    host.load()
    if "kernels_cpu_native" not in host.plugins:  # entry point not installed: register by hand
        host.register(cpu_native, name="kernels_cpu_native", first_party=True)
    expected = "avx512_bf16" if cpu_native.has_avx512_bf16() else "torch"
    assert host.registry().kernel("linear_bf16", "cpu").name == expected
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "1")
    assert host.registry().kernel("linear_bf16", "cpu").name == "torch"


# -- numerics against the reference --------------------------------------------------------------


@pytest.fixture(scope="module")
def native():
    """The native ops, built (or loaded from the cache) once for this module."""
    if not cpu_native.has_avx512_bf16():
        pytest.skip("no avx512_bf16")
    if cpu_native.native_disabled():
        pytest.skip(f"native kernels disabled by {cpu_native.DISABLE_ENV}")
    saved = (ops._ext, ops._failed)
    ops._reset_for_tests()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.NativeKernelWarning)
        ext = ops.extension()
    assert ext is not None, ops.status()
    yield ops
    if saved[0] is not None:
        ops._ext, ops._failed = saved


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y (bf16) is the fp32-accumulated product rounded once to bf16: within one bf16 rounding
    (2^-8 relative) of the exact product, plus fp32 summation noise; and within two roundings of
    torch's bf16 F.linear."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        exact = exact + b.double()
        scale = scale + b.double().abs()
    assert y.dtype == torch.bfloat16 and y.shape == (*x.shape[:-1], w.shape[0])
    err = (y.double() - exact).abs()
    bound = 2.0**-8 * exact.abs() + 1e-5 * scale + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    ref = torch_ops.linear_bf16(x, w, b).double()
    assert bool(((y.double() - ref).abs() <= 2.0**-7 * exact.abs() + 1e-4 * scale + 1e-30).all())


# (N, K): K tails (K % 32), K blocks (K > 2048, with a tail), N tails for the 3- and 4-row weight
# tiles (N % 3, N % 4), several 48-row panels per thread, and tiny shapes.
SHAPES = [(1, 1), (7, 17), (37, 100), (64, 64), (130, 2048), (300, 96), (19, 1000), (16, 8200), (101, 4133),
          (2, 2049)]
# Rows: 1 (row GEMV), 2..8 (one pass of 3-row tiles), 9..32 (passes of <= 6 rows with 4-row tiles).
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 19, 24, 29, 32]


@requires_avx512_bf16
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_bf16_matches_reference(native, m, n, k, bias):
    g = torch.Generator().manual_seed(1000 * m + 7 * n + k + bias)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    y = native.linear_bf16(x, w, b)
    _check(y, x, w, b)


@requires_avx512_bf16
@pytest.mark.parametrize("m", [8, 16, 32])
def test_linear_bf16_many_panels_and_threads(native, m):
    """Enough rows of W for several panels per thread (the next panel is prefetched while one computes)
    and an N tail, with 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(77 + m)
        x = torch.randn(m, 256, generator=g).to(torch.bfloat16)
        w = (torch.randn(1001, 256, generator=g) / 16).to(torch.bfloat16)
        b = torch.randn(1001, generator=g).to(torch.bfloat16)
        _check(native.linear_bf16(x, w, b), x, w, b)
    finally:
        torch.set_num_threads(threads)


@requires_avx512_bf16
def test_linear_bf16_shapes_strides_and_fallbacks(native):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(48, 72, generator=g) / 8).to(torch.bfloat16)
    b = torch.randn(48, generator=g).to(torch.bfloat16)
    # Leading dims are flattened: [B, T, K] with B*T <= MAX_ROWS goes native.
    x3 = torch.randn(2, 3, 72, generator=g).to(torch.bfloat16)
    y3 = native.linear_bf16(x3, w, b)
    assert y3.shape == (2, 3, 48)
    _check(y3, x3, w, b)
    x4 = torch.randn(4, 5, 72, generator=g).to(torch.bfloat16)
    _check(native.linear_bf16(x4, w, b), x4, w, b)
    # Non-contiguous rows: a strided view (copied), and rows further apart than K (used in place).
    for m in (4, 20):
        xs = torch.randn(m, 144, generator=g).to(torch.bfloat16)[:, ::2]
        _check(native.linear_bf16(xs, w, b), xs, w, b)
        xr = torch.randn(m, 100, generator=g).to(torch.bfloat16)[:, 10:82]
        assert xr.stride() == (100, 1)
        _check(native.linear_bf16(xr, w, b), xr, w, b)
    x1 = torch.randn(1, 72, generator=g).to(torch.bfloat16)
    _check(native.linear_bf16(x1, w), x1, w, None)
    # More than MAX_ROWS rows, other dtypes, and autograd are plain F.linear.
    assert native.MAX_ROWS == 32
    x33 = torch.randn(33, 72, generator=g).to(torch.bfloat16)
    assert torch.equal(native.linear_bf16(x33, w, b), F.linear(x33, w, b))
    xf, wf = x1.float(), w.float()
    assert torch.equal(native.linear_bf16(xf, wf), F.linear(xf, wf))
    wg = w.clone().requires_grad_(True)
    assert native.linear_bf16(x1, wg).requires_grad


@requires_avx512_bf16
def test_linear_and_tied_lm_head_use_the_kernel(native, monkeypatch):
    from mistralrs.nn.embedding import Embedding, compute_logits
    from mistralrs.nn.linear import SMALL_M_ROWS, Linear
    from mistralrs.plugins import PluginHost, reset_plugin_host

    host = PluginHost(environ={})
    host.load()
    if "kernels_cpu_native" not in host.plugins:
        host.register(cpu_native, name="kernels_cpu_native", first_party=True)
    reset_plugin_host(host)
    try:
        calls = []
        real = ops.linear_bf16
        monkeypatch.setattr(ops, "linear_bf16", lambda *a: calls.append(a[0].shape) or real(*a))
        g = torch.Generator().manual_seed(3)
        layer = Linear(64, 40, bias=True)
        layer.weight.data = (torch.randn(40, 64, generator=g) / 8).to(torch.bfloat16)
        layer.bias.data = torch.randn(40, generator=g).to(torch.bfloat16)
        layer.process_after_loading()
        x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
        _check(layer(x), x, layer.weight, layer.bias)
        xb = torch.randn(SMALL_M_ROWS, 64, generator=g).to(torch.bfloat16)  # a decode batch: native
        _check(layer(xb), xb, layer.weight, layer.bias)
        xp = torch.randn(SMALL_M_ROWS + 1, 64, generator=g).to(torch.bfloat16)  # prefill-sized: F.linear
        assert torch.equal(layer(xp), F.linear(xp, layer.weight, layer.bias))
        emb = Embedding(50, 64)
        emb.weight.data = (torch.randn(50, 64, generator=g) / 8).to(torch.bfloat16)
        logits = compute_logits(x, None, emb)
        assert logits.dtype == torch.float32
        _check(logits.to(torch.bfloat16), x, emb.weight, None)
        _check(compute_logits(xb, None, emb).to(torch.bfloat16), xb, emb.weight, None)
        assert compute_logits(xp, None, emb).shape == (SMALL_M_ROWS + 1, 50)
        assert calls == [(2, 64), (SMALL_M_ROWS, 64), (2, 64), (SMALL_M_ROWS, 64)]
    finally:
        reset_plugin_host(None)


# -- fallbacks ------------------------------------------------------------------------------------


def _fresh_state(monkeypatch):
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_failed", None)
    monkeypatch.setattr(ops, "has_avx512_bf16", lambda: True)  # reach the build on any CPU


def _two_calls_one_warning():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 40, generator=g).to(torch.bfloat16)
    w = torch.randn(24, 40, generator=g).to(torch.bfloat16)
    b = torch.randn(24, generator=g).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = ops.linear_bf16(x, w, b)
        y2 = ops.linear_bf16(x, w, b)
    native_warnings = [w for w in caught if issubclass(w.category, ops.NativeKernelWarning)]
    assert len(native_warnings) == 1, [str(w.message) for w in caught]
    assert torch.equal(y1, F.linear(x, w, b)) and torch.equal(y2, y1)
    return str(native_warnings[0].message)


def test_fallback_when_disabled_by_env(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "1")
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build when disabled"))
    assert "MISTRALRS_NO_NATIVE_KERNELS" in _two_calls_one_warning()
    assert ops.status()["loaded"] is False


def test_fallback_when_the_build_raises(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)

    def broken():
        raise RuntimeError("Error building extension 'x'\nc++: error: no such compiler")

    monkeypatch.setattr(ops, "_builder", broken)
    message = _two_calls_one_warning()
    assert "no such compiler" in message


def test_fallback_on_a_cpu_without_avx512_bf16(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "has_avx512_bf16", lambda: False)
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build for a CPU without avx512_bf16"))
    assert "avx512_bf16" in _two_calls_one_warning()


def test_fallback_when_there_is_no_compiler(monkeypatch, tmp_path):
    """A real build attempt with a missing C++ compiler (into an empty cache) fails softly."""
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "cache_root", lambda: tmp_path)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    _two_calls_one_warning()
    assert ops.status()["failed"]
