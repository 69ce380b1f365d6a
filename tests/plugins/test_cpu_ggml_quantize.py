"""The native GGML quantizer plugin (`mistralrs_plugins.kernels.cpu_ggml_quantize`): the op ``ggml_quantize`` for
all twelve GGML types, byte for byte against the torch reference (`formats.quantize`, itself bit-exact with
llama.cpp's ``quantize_row_*_ref``), on awkward rows (zeros, constants, one huge value, negative only, tiny and
subnormal values), fp32/bf16/fp16, any strides, read-only memory maps; thread-count invariance; the fallbacks;
registration; the GGML linear method going through the op.

Inputs are fresh random draws on every run: each test's generator is seeded from a per-run seed (printed with
a failure; set ``MISTRALRS_TEST_SEED`` to replay one) and the test's id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mistralrs_plugins.kernels import cpu_ggml_quantize
from mistralrs_plugins.kernels.cpu_ggml_quantize import TYPES, ops
from mistralrs_plugins.quant.ggml import formats

NAMES = list(TYPES)
requires_arch = pytest.mark.skipif(not cpu_ggml_quantize.native_arch(), reason="x86-64 or aarch64 only")




def awkward(rng: np.random.Generator, rows: int, cols: int) -> torch.Tensor:
    """fp32 [rows, cols] (rows >= 12): random normal rows, heavy tails, and the rows quantizers trip on."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0] = 0.0  # all zero: scales 0
    w[1] = np.float32(rng.standard_normal())  # constant: max == min
    w[2, rng.integers(cols)] = 3.0e5 * np.sign(rng.standard_normal())  # one huge value
    w[3] = -np.abs(w[3])  # negative only
    w[4] *= 1e-30  # tiny
    w[5] *= 1e-39  # subnormal
    w[6] = rng.standard_t(3, cols)  # heavy-tailed
    w[7, : cols // 2] = 0.0  # half zero: zero blocks beside live ones
    w[8] = np.abs(w[8])  # positive only
    w[9] = np.round(w[9] * 4) / 4  # many exact ties
    w[10] *= 0.02  # the scale of real weights
    w[11] = np.where(rng.random(cols) < 0.9, 0.0, w[11])  # sparse
    return torch.from_numpy(w)


def positive_zeros(w: torch.Tensor) -> torch.Tensor:
    """`w` with every -0.0 made +0.0 (tiny values may round to either in bf16/fp16). The torch reference takes
    q4_1/q5_1's min and max with amin/amax, which do not keep C's first-of-equal-values order on signed zeros
    (its m or d may be -0.0 where llama.cpp's is +0.0, or the reverse; the same values either way), so the
    comparisons with it use +0.0 only; the native op follows C there (`test_signed_zeros_as_in_c`)."""
    return torch.where(w == 0, torch.zeros_like(w), w)


# -- registration ---------------------------------------------------------------------------------


def test_registration_module_does_not_import_torch():
    code = (
        "import sys\n"
        "import mistralrs_plugins.kernels.cpu_ggml_quantize as m\n"
        "specs = []\n"
        "m.register_kernels(specs.append)\n"
        "specs[0].is_supported(device='cpu')\n"
        "assert 'torch' not in sys.modules, 'registration imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_registers_the_op_for_cpu_only(monkeypatch):
    monkeypatch.delenv(cpu_ggml_quantize.DISABLE_ENV, raising=False)
    specs = []
    cpu_ggml_quantize.register_kernels(specs.append)
    [spec] = specs
    assert (spec.name, spec.op, spec.devices, spec.priority) == ("native", "ggml_quantize", ("cpu",), 10)
    assert spec.impl == "mistralrs_plugins.kernels.cpu_ggml_quantize.ops:ggml_quantize"
    assert not spec.is_supported(device="cuda")
    assert spec.is_supported(device="cpu") == cpu_ggml_quantize.native_arch()
    monkeypatch.setenv(cpu_ggml_quantize.DISABLE_ENV, "1")
    assert not spec.is_supported(device="cpu")
    monkeypatch.setenv(cpu_ggml_quantize.DISABLE_ENV, "0")
    assert spec.is_supported(device="cpu") == cpu_ggml_quantize.native_arch()


def test_the_types_are_the_ggml_formats():
    assert {n: (bs, ts) for n, (bs, ts, _id) in TYPES.items()} == {
        n: (f.block_size, f.type_size) for n, f in formats.FORMATS.items()}
    assert sorted(t for _bs, _ts, t in TYPES.values()) == list(range(12))


def test_registry_picks_the_native_quantizer(monkeypatch):
    from mistralrs.plugins import PluginHost

    monkeypatch.delenv(cpu_ggml_quantize.DISABLE_ENV, raising=False)
    host = PluginHost(environ={})
    host.load()
    if "kernels_cpu_ggml_quantize" not in host.plugins:  # entry point not installed: register by hand
        host.register(cpu_ggml_quantize, name="kernels_cpu_ggml_quantize", first_party=True)
    registry = host.registry()
    reference = registry.reference_kernel("ggml_quantize")
    assert reference.impl == "mistralrs_plugins.quant.ggml.formats:quantize"
    if cpu_ggml_quantize.native_arch():
        assert registry.kernel("ggml_quantize", "cpu").name == "native"
    assert registry.kernel("ggml_quantize", "cuda").name == reference.name
    monkeypatch.setenv(cpu_ggml_quantize.DISABLE_ENV, "1")
    assert registry.kernel("ggml_quantize", "cpu").name == reference.name


# -- bit-exact with the reference -------------------------------------------------------------------


@pytest.fixture(scope="module")
def native():
    """The native op, built (or loaded from the cache) once for this module."""
    if not cpu_ggml_quantize.native_arch():
        pytest.skip("not an x86-64 or aarch64 CPU")
    if cpu_ggml_quantize.native_disabled():
        pytest.skip(f"native kernels disabled by {cpu_ggml_quantize.DISABLE_ENV}")
    saved = (ops._lazy.ext, ops._lazy.failed)
    ops._reset_for_tests()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.NativeKernelWarning)
        ext = ops.extension()
    assert ext is not None, ops.status()
    yield ext
    if saved[0] is not None:
        ops._lazy.ext, ops._lazy.failed = saved


def assert_same_bytes(got: torch.Tensor, want: torch.Tensor, name: str, block_bytes: int) -> None:
    assert got.dtype == torch.uint8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    if not torch.equal(got, want):
        bad = (got != want).reshape(got.shape[0], -1, block_bytes).any(-1).nonzero().tolist()
        pytest.fail(f"{name}: {len(bad)} blocks differ (row, block): {bad[:8]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_bytes_are_the_references(native, name, dtype, rng):
    w = positive_zeros(awkward(rng, 16, 1024).to(dtype))
    got = ops.ggml_quantize(name, w)
    assert_same_bytes(got, formats.quantize(name, w), name, TYPES[name][1])


@pytest.mark.parametrize("name", NAMES)
def test_fp16_weights(native, name, rng):
    w = positive_zeros((awkward(rng, 12, 512) * 0.5).clamp(-6e4, 6e4).half())
    assert_same_bytes(ops.ggml_quantize(name, w), formats.quantize(name, w), name, TYPES[name][1])


@pytest.mark.parametrize("name", ["q4_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k", "q8k"])
def test_odd_shapes(native, name, rng):
    """One block per row, a row of several conversion segments with a remainder, a single row."""
    bs = TYPES[name][0]
    for rows, cols in ((7, bs), (2, 8192 + 3 * 256), (1, 4 * bs)):
        w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)).bfloat16()
        assert_same_bytes(ops.ggml_quantize(name, w), formats.quantize(name, w), name, TYPES[name][1])


@pytest.mark.parametrize("name", ["q4_1", "q8_1", "q3k", "q4k", "q6k"])
def test_the_result_does_not_depend_on_the_thread_count(native, name, rng):
    w = torch.from_numpy(rng.standard_normal((203, 512)).astype(np.float32)).bfloat16()  # many work items
    tid = TYPES[name][2]
    one = native.quantize(w, tid, 1)
    for nt in (2, 3, 8):
        assert torch.equal(native.quantize(w, tid, nt), one), nt
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.ggml_quantize(name, w), one)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(ops.ggml_quantize(name, w), one)


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q2k", "q4k", "q6k"])
def test_non_contiguous_and_batched_weights(native, name, rng):
    base = positive_zeros(awkward(rng, 24, 1024))
    for dtype in (torch.float32, torch.bfloat16):
        b = base.to(dtype)
        views = {
            "transposed": b[:, :512].t().contiguous().t(),  # column-major [24, 512]
            "strided columns": b[:, ::2],  # [24, 512], stride 2 along the row
            "every other row": b[::2],
            "column slice": b[:, 256:768],
        }
        for what, x in views.items():
            assert not x.is_contiguous()
            assert torch.equal(ops.ggml_quantize(name, x), formats.quantize(name, x.contiguous())), (what, dtype)
    batched = base[:, :512].reshape(2, 12, 512)
    got = ops.ggml_quantize(name, batched)
    assert got.shape == (2, 12, 512 // TYPES[name][0] * TYPES[name][1])
    assert torch.equal(got, formats.quantize(name, batched))


def test_signed_zeros_as_in_c(native):
    """quantize_row_q4_1_ref / q5_1_ref keep the first of equal minima and maxima (``if (v < min) min = v``):
    a block of zeros starting with -0.0 has m = -0.0 (fp16 0x8000; d = m - m = +0.0), one starting with +0.0 has
    m = +0.0."""
    w = torch.zeros(2, 64)
    w[0, 0] = -0.0
    w[0, 33::2] = -0.0
    w[1, 1::2] = -0.0
    for name in ("q4_1", "q5_1"):
        q = ops.ggml_quantize(name, w).reshape(2, 2, -1)  # [row, block, bytes]: d, m (fp16), then the quants
        assert q[0, 0, :4].tolist() == [0x00, 0x00, 0x00, 0x80], name
        assert q[0, 1].eq(0).all() and q[1].eq(0).all() and q[0, 0, 4:].eq(0).all(), name


def test_a_read_only_memory_map(native, rng, tmp_path):
    path = tmp_path / "w.bin"
    w = awkward(rng, 16, 512)
    w.numpy().tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(16, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        t = torch.from_numpy(mm)
    for name in ("q4_0", "q4k"):
        assert torch.equal(ops.ggml_quantize(name, t), formats.quantize(name, w))
    assert torch.equal(torch.from_numpy(np.array(mm)), w)  # only read


def test_requires_grad_and_empty(native, rng):
    w = positive_zeros(awkward(rng, 12, 256)).requires_grad_()
    assert torch.equal(ops.ggml_quantize("q4k", w), formats.quantize("q4k", w))
    empty = ops.ggml_quantize("q4_0", torch.zeros(0, 64))
    assert empty.shape == (0, 36) and empty.dtype == torch.uint8


# -- llama.cpp's C code itself (optional) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_reference(tmp_path_factory):
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("set LLAMA_CPP_SRC to a llama.cpp source tree to compare with its C reference")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build llama.cpp's ggml-quants.c")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ggml_rmse.py"
    spec = importlib.util.spec_from_file_location("ggml_rmse_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod, mod.build_reference(src, tmp_path_factory.mktemp("ggmlq"))


@pytest.mark.parametrize("name", NAMES)
def test_bit_exact_with_llama_cpp_c_code(native, name, llama_cpp_reference, rng):
    """Also where the torch reference is not: signed zeros (q4_1, q5_1) and values so large that a sub-block's
    sums overflow to inf/NaN (q3k, q6k: C's ``>`` skips a NaN scale, torch's argmax picks it)."""
    mod, lib = llama_cpp_reference
    bs, ts, _ = TYPES[name]
    w = awkward(rng, 16, 1024).numpy()
    w[12, ::3] = -0.0  # signed zeros
    w[13, :64] = 0.0
    w[13, 0] = -0.0
    w[14, 5] = 1e19  # x**3 overflows
    w[15, 9] = -3e38
    for x in (w, torch.from_numpy(w).bfloat16().float().numpy()):
        want = torch.from_numpy(mod.c_quantize(lib, name, x, ts, bs))
        assert_same_bytes(ops.ggml_quantize(name, torch.from_numpy(x)), want, name, ts)


# -- fallbacks ----------------------------------------------------------------------------------------


def _fake_reference(monkeypatch, calls: list):
    def ref(name, weight):
        calls.append((name, tuple(weight.shape), weight.dtype))
        return formats.quantize(name, weight)

    monkeypatch.setattr(ops, "reference", lambda: ref)


def test_inputs_the_native_op_does_not_take_go_to_the_reference(native, monkeypatch, rng):
    calls: list = []
    _fake_reference(monkeypatch, calls)
    w = awkward(rng, 12, 256)
    assert torch.equal(ops.ggml_quantize("q4_0", w.double()), formats.quantize("q4_0", w.double()))  # float64
    for bad in (lambda: ops.ggml_quantize("q4_0", w[:, :250]),  # not whole blocks: the reference's error
                lambda: ops.ggml_quantize("q4k", w[:, :128]),
                lambda: ops.ggml_quantize("q9_9", w),  # unknown type
                lambda: ops.ggml_quantize("q4_0", torch.ones(4, 64, dtype=torch.int32)),
                lambda: ops.ggml_quantize("q4_0", torch.tensor(1.0))):
        with pytest.raises(ValueError):
            bad()
    assert len(calls) == 6
    ops.ggml_quantize("q4_0", w)
    ops.ggml_quantize("q4k", w.bfloat16())
    assert len(calls) == 6


def _fresh_state(monkeypatch):
    monkeypatch.setattr(ops._lazy, "ext", None)
    monkeypatch.setattr(ops._lazy, "failed", None)
    monkeypatch.setattr(ops, "native_arch", lambda: True)  # reach the build on any CPU


def _two_calls_one_warning(monkeypatch, rng) -> str:
    calls: list = []
    _fake_reference(monkeypatch, calls)
    w = awkward(rng, 12, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ops.ggml_quantize("q4k", w)
        b = ops.ggml_quantize("q8_0", w.bfloat16())
    native_warnings = [x for x in caught if issubclass(x.category, ops.NativeKernelWarning)]
    assert len(native_warnings) == 1, [str(x.message) for x in caught]
    assert native_warnings[0].filename == __file__  # points at the caller of the op
    assert [c[0] for c in calls] == ["q4k", "q8_0"]
    assert torch.equal(a, formats.quantize("q4k", w)) and torch.equal(b, formats.quantize("q8_0", w.bfloat16()))
    return str(native_warnings[0].message)


def test_fallback_when_the_build_raises(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_ggml_quantize.DISABLE_ENV, raising=False)

    def broken():
        raise RuntimeError("Error building extension 'x'\nc++: error: no such compiler")

    monkeypatch.setattr(ops, "_builder", broken)
    assert "no such compiler" in _two_calls_one_warning(monkeypatch, rng)
    assert ops.status()["failed"] and not ops.status()["loaded"]


def test_fallback_when_disabled_by_env(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(cpu_ggml_quantize.DISABLE_ENV, "1")
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build when disabled"))
    assert "MISTRALRS_NO_NATIVE_KERNELS" in _two_calls_one_warning(monkeypatch, rng)


def test_fallback_on_another_architecture(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_ggml_quantize.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "native_arch", lambda: False)
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build on another architecture"))
    assert "x86-64 or aarch64" in _two_calls_one_warning(monkeypatch, rng)


def test_fallback_when_there_is_no_compiler(monkeypatch, tmp_path, rng):
    """A real build attempt with a missing C++ compiler (into an empty cache) fails softly."""
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_ggml_quantize.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "cache_root", lambda: tmp_path)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    assert "no C++ compiler" in _two_calls_one_warning(monkeypatch, rng)


def test_the_registered_reference_is_what_the_fallback_calls():
    from mistralrs.plugins import get_registry
    from mistralrs.specs import resolve

    assert ops.reference() is resolve(get_registry().reference_kernel("ggml_quantize").impl) is formats.quantize


# -- the GGML linear method quantizes through the op ---------------------------------------------------


def test_the_linear_method_quantizes_through_the_op(monkeypatch, rng):
    from mistralrs_plugins.quant.ggml import method as ggml_method

    calls: list = []

    def fake_lookup(op, device):
        calls.append((op, str(device)))
        return lambda name, weight: formats.quantize(name, weight)

    monkeypatch.setattr(ggml_method, "lookup_kernel", fake_lookup)
    m = ggml_method.GgmlLinearMethod("q4k")
    w = awkward(rng, 12, 256).bfloat16()
    assert torch.equal(m.quantize(w)["qweight"], formats.quantize("q4k", w))
    m.quantize(w)
    assert calls == [("ggml_quantize", "cpu")]  # looked up once, then cached on the method


def test_the_linear_method_gets_the_native_op(monkeypatch, rng):
    from mistralrs_plugins.quant.ggml.method import GgmlLinearMethod

    monkeypatch.delenv(cpu_ggml_quantize.DISABLE_ENV, raising=False)
    m = GgmlLinearMethod("q6k")
    w = awkward(rng, 12, 512)
    assert torch.equal(m.quantize(w)["qweight"], formats.quantize("q6k", w))
    if cpu_ggml_quantize.native_arch():
        assert m._quantizer is ops.ggml_quantize
