"""The native CPU kernel plugin (`mistralrs_plugins.kernels.cpu_native`): the AVX-512-BF16
`linear_bf16` GEMV against the torch reference, its fallbacks, and its registration."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels import cpu_native
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


def test_registers_every_op_for_cpu_only(monkeypatch):
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    specs = []
    cpu_native.register_kernels(specs.append)
    amx = [s for s in specs if s.name == "amx_bf16"]  # tests/plugins/test_cpu_amx_linear.py
    specs = [s for s in specs if s.name not in ("amx_bf16", "avx2")]  # avx2: tests/plugins/test_cpu_native_avx2.py
    assert [s.op for s in amx] == ["linear_bf16"] and amx[0].priority > 10
    assert [s.op for s in specs] == ["linear_bf16", "rms_norm", "silu_and_mul", "rotary", "paged_attention_decode",
                                     "paged_attention_prefill"]
    for spec in specs:
        assert (spec.name, spec.devices, spec.priority) == ("avx512_bf16", ("cpu",), 10)
        assert spec.impl == f"mistralrs_plugins.kernels.cpu_native.ops:{spec.op}"
        assert callable(getattr(ops, spec.op)) and callable(getattr(torch_ops, spec.op))  # native + reference
        assert not spec.is_supported(device="cuda")
        assert spec.is_supported(device="cpu") == cpu_native.has_avx512_bf16()
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "1")
    assert not any(spec.is_supported(device="cpu") for spec in specs)
    monkeypatch.setenv(cpu_native.DISABLE_ENV, "0")
    assert all(spec.is_supported(device="cpu") == cpu_native.has_avx512_bf16() for spec in specs)


def test_cpu_features_off_makes_every_plugin_pick_as_on_a_cpu_without_them(monkeypatch):
    """MISTRALRS_CPU_FEATURES_OFF (one flag list for every native plugin): with avx512f off, an AVX-512 CPU
    gets the AVX2 kernels, as an AVX2-only machine would (how the benchmarks compare instruction sets)."""
    from mistralrs_plugins.kernels import cpu_quant, native_build

    real = native_build.cpu_flags()
    monkeypatch.setenv(native_build.CPU_FEATURES_OFF_ENV, " AVX512F, amx_tile ")
    native_build.cpu_flags.cache_clear()
    try:
        assert native_build.cpu_flags() == real - {"avx512f", "amx_tile"}
        assert cpu_native.cpu_flags is native_build.cpu_flags  # one reading of /proc/cpuinfo
        assert not cpu_native.has_avx512_bf16() and not cpu_native.has_amx_bf16()
        assert not cpu_quant.has_avx512_vnni()
        assert cpu_quant.has_avx2() == ({"avx2", "fma", "f16c"} <= real and native_build.is_x86_64())
    finally:
        monkeypatch.delenv(native_build.CPU_FEATURES_OFF_ENV)
        native_build.cpu_flags.cache_clear()
    assert native_build.cpu_flags() == real


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
    if cpu_native.has_amx_bf16():
        expected = "amx_bf16"
    elif cpu_native.has_avx512_bf16():
        expected = "avx512_bf16"
    else:  # cpu_quant's AVX2 kernel (priority 5) where it is installed and the CPU has AVX2, else torch
        from mistralrs_plugins.kernels import cpu_quant

        expected = "avx2" if "kernels_cpu_quant" in host.plugins and cpu_quant.has_avx2() else "torch"
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
    saved = (ops._lazy.ext, ops._lazy.failed)
    ops._reset_for_tests()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.NativeKernelWarning)
        ext = ops.extension()
    assert ext is not None, ops.status()
    yield ops
    if saved[0] is not None:
        ops._lazy.ext, ops._lazy.failed = saved


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


def _check_f32(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y (fp32 output) is the exact product up to fp32 summation noise: no bf16 rounding."""
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], w.shape[0])
    assert bool(((y.double() - exact).abs() <= 1e-5 * scale + 1e-30).all())


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
@pytest.mark.parametrize("m", [1, 3, 4, 7, 16, 32])
@pytest.mark.parametrize("n,k", [(37, 100), (130, 2048), (101, 4133)])
def test_linear_bf16_fp32_output(native, m, n, k):
    """`out_f32` (the LM head): the same kernel schedules, written without bf16 rounding."""
    g = torch.Generator().manual_seed(31 * m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    _check_f32(native.linear_bf16(x, w, out_f32=True), x, w, None)
    _check_f32(native.linear_bf16(x, w, b, out_f32=True), x, w, b)
    assert torch.equal(native.linear_bf16(x, w, b, out_f32=True).to(torch.bfloat16), native.linear_bf16(x, w, b))
    # the fallbacks honour it too: more rows than the kernel takes, and fp32 inputs
    xp = torch.randn(40, k, generator=g).to(torch.bfloat16)
    assert native.linear_bf16(xp, w, out_f32=True).dtype == torch.float32


@requires_avx512_bf16
@pytest.mark.parametrize("n,k", [(7, 17), (37, 100), (101, 4133), (130, 2048), (19, 1000), (64, 6200)])
@pytest.mark.parametrize("out_f32", [False, True])
def test_linear_bf16_rows_do_not_depend_on_the_batch(native, n, k, out_f32):
    """Batch invariance: a row's output is bit-identical whether computed alone, in any batch size (every
    schedule: 1-4 rows, 5-8, 9-64, several 64-row chunks) or at any position in the batch."""
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(150, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    full = native.linear_bf16(x, w, b, out_f32=out_f32)
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 64, 65, 130):
        for start in (0, 150 - m):
            part = native.linear_bf16(x[start:start + m], w, b, out_f32=out_f32)
            assert torch.equal(part, full[start:start + m]), (m, start)


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
    # Leading dims are flattened: [B, T, K] goes native as B*T rows.
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
    # Prefill-sized row counts (several row chunks) are native too; other dtypes and autograd are F.linear.
    x200 = torch.randn(200, 72, generator=g).to(torch.bfloat16)
    _check(native.linear_bf16(x200, w, b), x200, w, b)
    xf, wf = x1.float(), w.float()
    assert torch.equal(native.linear_bf16(xf, wf), F.linear(xf, wf))
    wg = w.clone().requires_grad_(True)
    assert native.linear_bf16(x1, wg).requires_grad


@requires_avx512_bf16
def test_linear_and_tied_lm_head_use_the_kernel(native, monkeypatch):
    from mistralrs.nn.embedding import Embedding, compute_logits
    from mistralrs.nn.linear import Linear
    from mistralrs.plugins import PluginHost, reset_plugin_host

    host = PluginHost(environ={})
    host.load()
    if "kernels_cpu_native" not in host.plugins:
        host.register(cpu_native, name="kernels_cpu_native", first_party=True)
    reset_plugin_host(host)
    try:
        calls = []
        real = ops.linear_bf16
        monkeypatch.setattr(ops, "linear_bf16", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
        g = torch.Generator().manual_seed(3)
        layer = Linear(64, 40, bias=True)
        layer.weight.data = (torch.randn(40, 64, generator=g) / 8).to(torch.bfloat16)
        layer.bias.data = torch.randn(40, generator=g).to(torch.bfloat16)
        layer.process_after_loading()
        x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
        _check(layer(x), x, layer.weight, layer.bias)
        xb = torch.randn(32, 64, generator=g).to(torch.bfloat16)  # a decode batch
        _check(layer(xb), xb, layer.weight, layer.bias)
        xp = torch.randn(100, 64, generator=g).to(torch.bfloat16)  # a prefill
        _check(layer(xp), xp, layer.weight, layer.bias)
        emb = Embedding(50, 64)
        emb.weight.data = (torch.randn(50, 64, generator=g) / 8).to(torch.bfloat16)
        logits = compute_logits(x, None, emb)  # tied head: fp32 straight from the kernel
        _check_f32(logits, x, emb.weight, None)
        _check_f32(compute_logits(xb, None, emb), xb, emb.weight, None)
        _check_f32(compute_logits(xp, None, emb), xp, emb.weight, None)
        _check_f32(compute_logits(x, layer, emb), x, layer.weight, layer.bias)  # untied head with a bias
        assert calls == [(2, 64), (32, 64), (100, 64), (2, 64), (32, 64), (100, 64), (2, 64)]
    finally:
        reset_plugin_host(None)


# -- fallbacks ------------------------------------------------------------------------------------


def _fresh_state(monkeypatch):
    monkeypatch.setattr(ops._lazy, "ext", None)
    monkeypatch.setattr(ops._lazy, "failed", None)
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


# -- rms_norm, silu_and_mul ------------------------------------------------------------------------


def _no_worse_than_reference(native_out, ref_out, exact, ulp_slack):
    """The native op (fp32 math, one rounding) is at least as close to the exact value as the torch
    reference, up to `ulp_slack` of the output dtype."""
    err_native = (native_out.double() - exact).abs()
    err_ref = (ref_out.double() - exact).abs()
    eps = torch.finfo(native_out.dtype).eps
    assert native_out.dtype == ref_out.dtype and native_out.shape == ref_out.shape
    assert bool((err_native <= err_ref + ulp_slack * eps * exact.abs() + 1e-6).all())


@requires_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h", [1, 15, 64, 2048, 2053])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_matches_reference(native, dtype, h, unit_offset):
    g = torch.Generator().manual_seed(h + unit_offset)
    x = (torch.randn(3, 5, h, generator=g) * 3).to(dtype)
    w = torch.randn(h, generator=g).to(dtype)
    y = native.rms_norm(x, w, 1e-6, unit_offset)
    ref = torch_ops.rms_norm(x, w, 1e-6, unit_offset)
    xd, wd = x.double(), w.double() + (1.0 if unit_offset else 0.0)
    exact = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    _no_worse_than_reference(y, ref, exact, ulp_slack=1)
    if dtype is torch.bfloat16:  # same fp32 math and one rounding: nearly always the same bits
        assert (y != ref).float().mean().item() < 0.01


@requires_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("i", [1, 16, 100, 8192])
def test_silu_and_mul_matches_reference(native, dtype, i):
    g = torch.Generator().manual_seed(i)
    x = (torch.randn(4, 2 * i, generator=g) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)[: min(4, 2 * i)][:4]  # saturation and zero
    y = native.silu_and_mul(x)
    xd = x.double()
    gate, up = xd[:, :i], xd[:, i:]
    exact = gate * torch.sigmoid(gate) * up
    _no_worse_than_reference(y, torch_ops.silu_and_mul(x), exact, ulp_slack=1)


@requires_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,rotary_dim,interleaved", [(64, None, False), (128, None, False), (80, 32, False),
                                                       (72, 40, False), (64, None, True), (96, 48, True)])
@pytest.mark.parametrize("t", [1, 16, 300])
def test_rotary_matches_reference(native, dtype, d, rotary_dim, interleaved, t):
    g = torch.Generator().manual_seed(t + d)
    half = (rotary_dim or d) // 2
    angles = torch.rand(t, half, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    x = (torch.randn(t, 6, d, generator=g) * 3).to(dtype)
    for xv in (x, torch.randn(t, 12, d, generator=g).to(dtype)[:, ::2]):  # contiguous, and strided heads
        y = native.rotary(xv, cos, sin, rotary_dim, interleaved)
        ref = torch_ops.rotary(xv, cos, sin, rotary_dim, interleaved)
        exact = torch_ops.rotary(xv.double(), cos.double(), sin.double(), rotary_dim, interleaved)
        assert y.dtype == dtype and y.shape == xv.shape
        _no_worse_than_reference(y, ref, exact, ulp_slack=1)
        if rotary_dim:  # the dims past rotary_dim pass through unchanged
            assert torch.equal(y[..., rotary_dim:], xv[..., rotary_dim:])


@requires_avx512_bf16
def test_decode_ops_fall_back_for_other_dtypes(native):
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    assert torch.equal(native.rms_norm(x, w, 1e-5), torch_ops.rms_norm(x, w, 1e-5))
    assert torch.equal(native.silu_and_mul(x), torch_ops.silu_and_mul(x))


# -- paged_attention_decode ---------------------------------------------------------------------------


def _paged_case(seed, lens, *, hq, hk, d, dv, bs, dtype, blocks=64):
    """Random K/V in a cache of `blocks` blocks, and sequences whose blocks are scattered through it."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(blocks * bs, hk, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks * bs, hk, dv, generator=g).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    width = max(-(-n // bs) for n in lens)
    order = torch.randperm(blocks, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        tables[i, :nb] = order[used:used + nb]
        used += nb
    return q, k_cache, v_cache, tables, torch.tensor(lens)


PAGED_CASES = [
    # lens, Hq, Hk, D, Dv, block size, window, softcap
    ([1, 37, 100], 8, 2, 64, 64, 16, None, None),
    ([5, 70], 6, 6, 40, 24, 8, 17, None),  # MHA, head dims that are not multiples of 16, Dv != D
    ([33, 2, 64, 200], 12, 2, 128, 128, 32, None, 30.0),  # groups of 6 query heads, softcap
    ([513], 32, 8, 64, 64, 32, 100, 50.0),  # Llama-3.2-1B heads, window + softcap
    ([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 300], 32, 8, 64, 64, 32, None, None),  # 16-way
    ([1], 4, 1, 256, 256, 8, None, None),  # Gemma's head dim
]


@requires_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: f"S{len(c[0])}-H{c[1]}/{c[2]}-D{c[3]}")
def test_paged_attention_decode_matches_reference(native, dtype, case):
    lens, hq, hk, d, dv, bs, window, softcap = case
    q, kc, vc, tables, seq_lens = _paged_case(sum(lens) + hq, lens, hq=hq, hk=hk, d=d, dv=dv, bs=bs, dtype=dtype)
    scale = d ** -0.5
    out = native.paged_attention_decode(q, kc, vc, tables, seq_lens, bs, scale, window, softcap)
    ref = torch_ops.paged_attention_decode(q, kc, vc, tables, seq_lens, bs, scale, window, softcap)
    exact = torch_ops.paged_attention_decode(q.double(), kc.double(), vc.double(), tables, seq_lens, bs, scale,
                                             window, softcap)
    assert out.dtype == dtype and out.shape == (len(lens), hq, dv)
    tol = 2e-6 if dtype is torch.float32 else 2.0**-8
    assert (out.double() - exact).abs().max().item() <= max(tol, (ref.double() - exact).abs().max().item())


@requires_avx512_bf16
def test_paged_attention_decode_input_checks_and_fallbacks(native):
    q, kc, vc, tables, lens = _paged_case(1, [9, 20], hq=4, hk=2, d=16, dv=16, bs=4, dtype=torch.float32, blocks=8)
    ok = native.paged_attention_decode(q, kc, vc, tables, lens, 4, 0.25)
    # int32 block tables and a non-contiguous q are accepted
    torch.testing.assert_close(native.paged_attention_decode(q.transpose(0, 1).contiguous().transpose(0, 1), kc, vc,
                                                             tables.int(), lens, 4, 0.25), ok)
    # a table pointing outside the cache, and a sequence longer than its table, are errors, not reads
    bad = tables.clone()
    bad[0, 0] = 8
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.paged_attention_decode(q, kc, vc, bad, lens, 4, 0.25)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        native.paged_attention_decode(q, kc, vc, tables, torch.tensor([9, 21]), 4, 0.25)
    # an fp8 cache (no native path) uses the reference
    if hasattr(torch, "float8_e4m3fn"):
        k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        out = native.paged_attention_decode(q, k8, v8, tables, lens, 4, 0.25)
        torch.testing.assert_close(out, torch_ops.paged_attention_decode(q, k8, v8, tables, lens, 4, 0.25))


# -- paged_attention_prefill ---------------------------------------------------------------------------

PREFILL_CASES = [
    # (seq_len, new tokens) per sequence, Hq, Hk, D, Dv, block size, window, softcap
    ([(37, 37), (100, 12), (5, 5)], 8, 2, 64, 64, 16, None, None),  # a whole prompt, a chunk after context
    ([(70, 70), (9, 1)], 6, 6, 40, 24, 8, 17, None),  # MHA, odd head dims, window; a one-token "chunk"
    ([(200, 64), (33, 33)], 12, 2, 128, 128, 32, None, 30.0),  # groups of 6 query heads, softcap
    ([(300, 300)], 32, 8, 64, 64, 16, 100, None),  # Llama-3.2-1B heads, sliding window
]


def _prefill_case(case, dtype):
    seqs, hq, hk, d, dv, bs, window, softcap = case
    lens = [sl for sl, _ in seqs]
    _, kc, vc, tables, seq_lens = _paged_case(sum(lens) + hq, lens, hq=hq, hk=hk, d=d, dv=dv, bs=bs, dtype=dtype)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], hq, d, generator=torch.Generator().manual_seed(hq + d)).to(dtype)
    return q, kc, vc, tables, seq_lens, starts


@requires_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"S{len(c[0])}-H{c[1]}/{c[2]}-D{c[3]}")
def test_paged_attention_prefill_matches_reference(native, dtype, case):
    q, kc, vc, tables, seq_lens, starts = _prefill_case(case, dtype)
    bs, window, softcap = case[5], case[6], case[7]
    scale = q.shape[-1] ** -0.5
    out = native.paged_attention_prefill(q, kc, vc, tables, seq_lens.tolist(), starts, bs, scale, window, softcap)
    ref = torch_ops.paged_attention_prefill(q, kc, vc, tables, seq_lens, starts, bs, scale, window, softcap)
    exact = torch_ops.paged_attention_prefill(q.double(), kc.double(), vc.double(), tables, seq_lens, starts, bs,
                                              scale, window, softcap)
    assert out.dtype == dtype and out.shape == (starts[-1], q.shape[1], vc.shape[-1])
    tol = 2e-6 if dtype is torch.float32 else 2.0**-8
    assert (out.double() - exact).abs().max().item() <= max(tol, (ref.double() - exact).abs().max().item())


@requires_avx512_bf16
def test_paged_attention_prefill_rows_are_what_decode_gives_them(native):
    """Each new token's attention is bit-identical to the decode kernel's for that token: how a prompt is
    chunked or batched, or whether a token is computed in prefill or decode, does not change it."""
    case = PREFILL_CASES[0]
    q, kc, vc, tables, seq_lens, starts = _prefill_case(case, torch.bfloat16)
    for window in (None, 60, 1000):  # a window that cuts in (rows alone), one that never does (rows grouped)
        out = native.paged_attention_prefill(q, kc, vc, tables, seq_lens, torch.tensor(starts), 16, 0.125, window)
        for i, (sl, n) in enumerate(case[0]):
            rows = torch.arange(starts[i], starts[i + 1])
            lens = torch.arange(sl - n + 1, sl + 1)
            alone = native.paged_attention_decode(q[rows], kc, vc, tables[i].expand(n, -1), lens, 16, 0.125, window)
            assert torch.equal(out[rows], alone)
    # the same tokens as two chunks of the first prompt (the first 20, then 17 more over their context)
    first = native.paged_attention_prefill(q[:20], kc, vc, tables[:1], [20], [0, 20], 16, 0.125)
    second = native.paged_attention_prefill(q[20:37], kc, vc, tables[:1], [37], [0, 17], 16, 0.125)
    assert torch.equal(torch.cat([first, second]), out[:37])


@requires_avx512_bf16
def test_paged_attention_prefill_input_checks_and_fallbacks(native):
    q, kc, vc, tables, seq_lens, starts = _prefill_case(PREFILL_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="query_start_loc must run from 0"):
        native.paged_attention_prefill(q, kc, vc, tables, seq_lens, [0, 37, 49, 53], 16, 0.125)
    with pytest.raises(RuntimeError, match="new tokens but seq_lens"):
        native.paged_attention_prefill(q, kc, vc, tables, [37, 100, 4], [0, 37, 49, 54], 16, 0.125)
    bad = tables.clone()
    bad[1, 0] = 10_000
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.paged_attention_prefill(q, kc, vc, bad, seq_lens, starts, 16, 0.125)
    # attention sinks (no native path) use the reference
    sinks = torch.randn(q.shape[1])
    out = native.paged_attention_prefill(q, kc, vc, tables, seq_lens, starts, 16, 0.125, sinks=sinks)
    torch.testing.assert_close(out, torch_ops.paged_attention_prefill(q, kc, vc, tables, seq_lens, starts, 16, 0.125,
                                                                      sinks=sinks))
