"""The quantized matmul plugin (`mistralrs_plugins.kernels.cpu_quant`): ``qmatmul_<type>`` for the GGML block
formats q4_0, q8_0, q4_K, q5_K, q6_K, with its AVX2 tiles and (where the CPU has avx512f/bw/vl/vnni; skipped
elsewhere) its AVX-512 VNNI tiles, against an exact emulation of llama.cpp's arithmetic, against ``F.linear`` on
the dequantized weights, batch and thread-count invariance, fallbacks, registration.

Oracles: ``gguf.quants`` (numpy, llama.cpp's reference formats) dequantizes the weights and quantizes
q8_0 activations; the emulation below decodes the blocks into integers and scales (checked against
gguf's dequantization), quantizes activations as llama.cpp's quantize_row_q8_0_ref / q8_K_ref do, and
forms exact integer block dot products (float64) with fp32 scale products.

Inputs are fresh random draws on every run: each test's generators are seeded from a per-run seed
(printed with a failure; set ``MISTRALRS_TEST_SEED`` to replay one) and the test's id.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mistralrs_plugins.kernels import cpu_quant
from mistralrs_plugins.kernels.cpu_quant import FORMATS, ops
from mistralrs_plugins.quant.ggml import interleave

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402 - after the importorskip

requires_avx2 = pytest.mark.skipif(not cpu_quant.has_avx2(), reason="the kernels need x86-64 with avx2, fma, f16c")
requires_vnni = pytest.mark.skipif(not cpu_quant.has_avx512_vnni(),
                                   reason="the VNNI tiles need avx512f, avx512bw, avx512vl, avx512_vnni")
# The instruction sets every numerical test runs with: the op of the AVX2 tiles and that of the VNNI tiles.
ISAS = [pytest.param("avx2", id="avx2"), pytest.param("vnni", id="vnni", marks=requires_vnni)]


def kernel(name: str, isa: str):
    return getattr(ops, f"qmatmul_{name}" + ("_vnni" if isa == "vnni" else ""))

TYPES = list(FORMATS)
GGML = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0, "q4k": GGMLQuantizationType.Q4_K,
        "q5k": GGMLQuantizationType.Q5_K, "q6k": GGMLQuantizationType.Q6_K}




def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))


# -- weights: random valid blocks, decoded to integers --------------------------------------------


def random_qweight(name: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 [n, k / block * bytes]: q4_0/q8_0 quantized from random floats by gguf; k-quants random bytes
    (every bit pattern of the quants and sub-block scales is valid) with sane fp16 super-block scales."""
    elems, nbytes, _act, _qtype = FORMATS[name]
    if name in ("q4_0", "q8_0"):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(gguf_quants.quantize(w, GGML[name])))
    nb = k // elems
    raw = rng.integers(0, 256, size=(n, nb, nbytes), dtype=np.uint8)

    def fp16(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float16).view(np.uint8).reshape(*a.shape, 2)

    if name in ("q4k", "q5k"):  # |w| ~ d * 63 * 31 at most; keep outputs O(1)
        raw[..., 0:2] = fp16(rng.uniform(0.2, 1.0, (n, nb)) / (64 * 16 * np.sqrt(k) / 16))
        raw[..., 2:4] = fp16(rng.uniform(0.0, 1.0, (n, nb)) / (64 * 16 * np.sqrt(k) / 8))
    else:
        raw[..., 208:210] = fp16(rng.uniform(0.2, 1.0, (n, nb)) / (128 * 32 * np.sqrt(k) / 16))
    return torch.from_numpy(raw.reshape(n, nb * nbytes))


def gguf_dequant(name: str, qw: torch.Tensor) -> torch.Tensor:
    elems, nbytes, _act, _qtype = FORMATS[name]
    k = qw.shape[1] // nbytes * elems
    return torch.from_numpy(gguf_quants.dequantize(qw.numpy(), GGML[name]).reshape(qw.shape[0], k).astype(np.float32))


def _f16(u8: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u8.numpy()).view(np.float16).astype(np.float32)[..., 0])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins of q4_K/q5_K (llama.cpp's get_scale_min_k4)."""
    sc = torch.empty(*s.shape[:-1], 8, dtype=torch.long)
    mn = torch.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j], mn[..., j] = s[..., j] & 63, s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    return sc, mn


def decode(name: str, qw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer quants and fp32 scales per block, following ggml's dequantize_row_* (block layouts of
    ggml-common.h). q: [N, nb, elems] int64, signed (q4_0: nibble - 8, q6_K: 6-bit - 32)."""
    elems, nbytes, _act, _qtype = FORMATS[name]
    n, nb = qw.shape[0], qw.shape[1] // nbytes
    blk = qw.reshape(n, nb, nbytes)
    v = blk.long()
    if name == "q4_0":
        return {"d": _f16(blk[..., 0:2]), "q": torch.cat([v[..., 2:] & 0xF, v[..., 2:] >> 4], -1) - 8}
    if name == "q8_0":
        return {"d": _f16(blk[..., 0:2]), "q": blk[..., 2:].view(torch.int8).long()}
    if name in ("q4k", "q5k"):
        sc, mn = _k_scales(v[..., 4:16])
        qs = v[..., 48:] if name == "q5k" else v[..., 16:]
        parts = []
        for j in range(4):
            lo, hi = qs[..., 32 * j:32 * j + 32] & 0xF, qs[..., 32 * j:32 * j + 32] >> 4
            if name == "q5k":
                qh = v[..., 16:48]
                lo = lo + ((qh >> (2 * j)) & 1) * 16
                hi = hi + ((qh >> (2 * j + 1)) & 1) * 16
            parts += [lo, hi]
        return {"d": _f16(blk[..., 0:2]), "dmin": _f16(blk[..., 2:4]), "sc": sc, "mn": mn, "q": torch.cat(parts, -1)}
    ql, qh = v[..., :128], v[..., 128:192]
    q = torch.empty(n, nb, 256, dtype=torch.long)
    for h in range(2):
        l1, l2, hh = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        q[..., 128 * h:128 * h + 32] = (l1 & 0xF) | ((hh & 3) << 4)
        q[..., 128 * h + 32:128 * h + 64] = (l2 & 0xF) | (((hh >> 2) & 3) << 4)
        q[..., 128 * h + 64:128 * h + 96] = (l1 >> 4) | (((hh >> 4) & 3) << 4)
        q[..., 128 * h + 96:128 * h + 128] = (l2 >> 4) | (((hh >> 6) & 3) << 4)
    return {"d": _f16(blk[..., 208:210]), "sc": blk[..., 192:208].view(torch.int8).long(), "q": q - 32}


def dequant_from_ints(name: str, w: dict[str, torch.Tensor]) -> torch.Tensor:
    n, nb = w["q"].shape[:2]
    if name in ("q4_0", "q8_0"):
        return (w["d"][..., None] * w["q"].float()).reshape(n, -1)
    if name in ("q4k", "q5k"):
        q = w["q"].reshape(n, nb, 8, 32).float()
        y = (w["d"][..., None] * w["sc"].float())[..., None] * q - (w["dmin"][..., None] * w["mn"].float())[..., None]
        return y.reshape(n, -1)
    q = w["q"].reshape(n, nb, 16, 16).float()
    return ((w["d"][..., None] * w["sc"].float())[..., None] * q).reshape(n, -1)


# -- activations: llama.cpp's quantize_row_q8_0_ref / quantize_row_q8_K_ref ----------------------


def q8_0_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d = amax / 127 (stored as fp16), q = roundf(x * (1 / d)) (half away from zero). -> (q [M, nb, 32], d)."""
    m, k = x.shape
    b = x.float().reshape(m, k // 32, 32)
    d = b.abs().amax(-1) / torch.tensor(127.0)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = (b * inv[..., None]).double()
    return (torch.sign(v) * torch.floor(v.abs() + 0.5)).long(), d.half().float()


def q8_K_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max = the first element of largest |x|, iscale = -127 / max, q = min(127, round-half-even(iscale * x)),
    d = 1 / iscale; all-zero blocks: d = 0, q = 0. -> (q [M, nb, 256], d)."""
    m, k = x.shape
    b = x.float().reshape(m, k // 256, 256)
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))[..., 0]  # argmax: the first maximum
    zero = mx == 0
    safe = torch.where(zero, torch.ones_like(mx), mx)
    iscale = torch.tensor(-127.0) / safe
    q = torch.round(b * iscale[..., None]).clamp(max=127).long()
    q = torch.where(zero[..., None], torch.zeros_like(q), q)
    return q, torch.where(zero, torch.zeros_like(mx), 1.0 / iscale)


def _block_dots(ya: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact integer dot products per (sub-)block: ya [M, B, e], wq [N, B, e] -> [M, N, B] (float64: exact)."""
    return torch.bmm(ya.permute(1, 0, 2).double(), wq.permute(1, 2, 0).double()).permute(1, 2, 0)


def emulate(name: str, x: torch.Tensor, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's result in exact arithmetic: integer block dots, fp32 scale products, float64 sums.
    Returns (y [M, N], magnitude [M, N]): magnitude sums the absolute integer terms as the kernel adds them
    (unsigned quants and the offset terms separately) times the scales: the bound for fp32 rounding."""
    w = decode(name, qw)
    n, nb = w["q"].shape[:2]
    m = x.shape[0]
    if name in ("q4_0", "q8_0"):
        qa, da = q8_0_act(x)
        s = (da[:, None, :] * w["d"][None]).double()  # the fp32 product of the two scales, exactly
        y = (s * _block_dots(qa, w["q"])).sum(-1)
        mag = (s.abs() * _block_dots(qa.abs(), w["q"].abs())).sum(-1)
        return y, mag
    qa, da = q8_K_act(x)
    if name in ("q4k", "q5k"):
        ya, wq = qa.reshape(m, nb * 8, 32), w["q"].reshape(n, nb * 8, 32)
        sc, mn = w["sc"].double(), w["mn"].double()
        isum = (_block_dots(ya, wq).reshape(m, n, nb, 8) * sc).sum(-1)
        iabs = (_block_dots(ya.abs(), wq).reshape(m, n, nb, 8) * sc).sum(-1)
        bs = qa.reshape(m, nb, 8, 32).sum(-1).double()  # sums of 32
        msum = (bs[:, None] * mn[None]).sum(-1)
        mabs = (bs.abs()[:, None] * mn[None]).sum(-1)
        d1 = (da[:, None, :] * w["d"][None]).double()
        d2 = (-da[:, None, :] * w["dmin"][None]).double()
        return (d1 * isum + d2 * msum).sum(-1), (d1.abs() * iabs + d2.abs() * mabs).sum(-1)
    ya, wq = qa.reshape(m, nb * 16, 16), w["q"].reshape(n, nb * 16, 16)
    sc = w["sc"].double()
    isum = (_block_dots(ya, wq).reshape(m, n, nb, 16) * sc).sum(-1)
    bs = qa.reshape(m, nb, 16, 16).abs().sum(-1).double()
    iabs = (_block_dots(ya.abs(), wq + 32).reshape(m, n, nb, 16) * sc.abs()).sum(-1) + 32 * (bs[:, None] * sc.abs()).sum(-1)
    d1 = (da[:, None, :] * w["d"][None]).double()
    return (d1 * isum).sum(-1), (d1.abs() * iabs).sum(-1)


# -- registration ---------------------------------------------------------------------------------


def test_registration_module_does_not_import_torch():
    code = (
        "import sys\n"
        "import mistralrs_plugins.kernels.cpu_quant as m\n"
        "specs = []\n"
        "m.register_kernels(specs.append)\n"
        "specs[0].is_supported(device='cpu')\n"
        "assert 'torch' not in sys.modules, 'registration imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_registers_every_op_for_cpu_only(monkeypatch):
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    specs = []
    cpu_quant.register_kernels(specs.append)
    specs = [s for s in specs if s.op.startswith("qmatmul_")]  # linear_bf16: test_cpu_linear_bf16_avx2.py
    avx2 = [s for s in specs if s.name == "avx2_q8"]
    vnni = [s for s in specs if s.name == "avx512_vnni"]
    assert len(avx2) + len(vnni) == len(specs)
    for group, suffix, priority, has in ((avx2, "", 10, cpu_quant.has_avx2()),
                                         (vnni, "_vnni", 20, cpu_quant.has_avx512_vnni())):
        assert [s.op for s in group] == ["qmatmul_q4_0", "qmatmul_q8_0", "qmatmul_q4k", "qmatmul_q5k", "qmatmul_q6k",
                                         "qmatmul_affine"]
        for spec in group:
            assert (spec.devices, spec.priority) == (("cpu",), priority)
            assert spec.impl == f"mistralrs_plugins.kernels.cpu_quant.ops:{spec.op}{suffix}"
            assert callable(getattr(ops, spec.op + suffix))
            assert not spec.is_supported(device="cuda")
            assert spec.is_supported(device="cpu") == has
    assert cpu_quant.VNNI_PRIORITY > 10
    monkeypatch.setenv(cpu_quant.DISABLE_ENV, "1")
    assert not any(spec.is_supported(device="cpu") for spec in specs)
    monkeypatch.setenv(cpu_quant.DISABLE_ENV, "0")
    assert all(spec.is_supported(device="cpu") == cpu_quant.has_avx2() for spec in avx2)
    assert all(spec.is_supported(device="cpu") == cpu_quant.has_avx512_vnni() for spec in vnni)


def test_vnni_needs_every_avx512_flag(monkeypatch):
    """The VNNI tiles claim the CPU only with avx2/fma/f16c and all of avx512f, bw, vl, vnni."""
    monkeypatch.setattr(cpu_quant, "is_x86_64", lambda: True)
    full = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    monkeypatch.setattr(cpu_quant, "cpu_flags", lambda: frozenset(full))
    assert cpu_quant.has_avx512_vnni()
    for missing in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2"):
        monkeypatch.setattr(cpu_quant, "cpu_flags", lambda m=missing: frozenset(full - {m}))
        assert not cpu_quant.has_avx512_vnni(), missing


def test_registry_picks_the_native_kernel(monkeypatch):
    from mistralrs.plugins import PluginHost

    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    host = PluginHost(environ={})
    host.load()
    if "kernels_cpu_quant" not in host.plugins:  # entry point not installed: register by hand
        host.register(cpu_quant, name="kernels_cpu_quant", first_party=True)
    registry = host.registry()
    for name in TYPES:
        if cpu_quant.has_avx512_vnni():
            assert registry.kernel(f"qmatmul_{name}", "cpu").name == "avx512_vnni"
        elif cpu_quant.has_avx2():
            assert registry.kernel(f"qmatmul_{name}", "cpu").name == "avx2_q8"
    monkeypatch.setenv(cpu_quant.DISABLE_ENV, "1")
    references = [s for s in registry.kernels if s.op == "qmatmul_q4_0" and s.reference]
    if references:  # the GGML quantizer plugin's torch reference takes over
        assert registry.kernel("qmatmul_q4_0", "cpu").name == references[0].name


# -- the oracles agree with gguf ------------------------------------------------------------------


@pytest.mark.parametrize("name", TYPES)
def test_decoded_blocks_are_ggufs_dequantization(name, rng):
    qw = random_qweight(name, 5, 512, rng)
    torch.testing.assert_close(dequant_from_ints(name, decode(name, qw)), gguf_dequant(name, qw), rtol=1e-6, atol=0)


def test_q8_0_emulation_is_ggufs_quantization(rng):
    x = randn(rng, 6, 256)
    x[1] = 0.0  # an all-zero row: d = 0, q = 0
    x[2, :32] = torch.tensor([127.0, 0.5, -0.5, 1.5, -1.5, 2.5] + [0.0] * 26)  # halves round away from zero
    q, d = q8_0_act(x)
    ref = gguf_quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(6, 8, 34)
    assert np.array_equal(q.numpy().astype(np.int8), ref[..., 2:].view(np.int8))
    assert np.array_equal(d.numpy(), ref[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert q[2, 0, :6].tolist() == [127, 1, -1, 2, -2, 3]


# -- activation quantization: bit-exact --------------------------------------------------------------


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
        ext = ops.extension()
    assert ext is not None, ops.status()
    yield ext
    if saved[0] is not None:
        ops._lazy.ext, ops._lazy.failed = saved


def _special_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    x = x.clone()
    x[0] = 0.0  # all zeros
    x[1, :block] = 0.0
    x[1, 3], x[1, 7] = 2.0, -2.0  # a tie for the largest magnitude: the first one is "max" (q8_K)
    x[2, :8] = torch.tensor([127.0, 0.5, -0.5, 1.5, 2.5, -2.5, 126.5, -126.5])  # exact halves
    x[3, :8] = torch.tensor([-127.0, 0.5, -0.5, 1.5, 2.5, -2.5, 126.5, -126.5])
    x[4] *= 1e-30  # tiny (subnormal scales)
    x[5] *= 1e20
    return x


def test_q8_0_activation_quantization_is_llama_cpps(native, rng):
    x = _special_rows(randn(rng, 9, 1024, scale=3.0), 32)
    qs, d, _ = native.quantize_act(x, False)
    q_ref, d_ref = q8_0_act(x)
    assert torch.equal(qs.long(), q_ref.reshape(9, -1))
    assert torch.equal(d, d_ref)


def test_q8_K_activation_quantization_is_llama_cpps(native, rng):
    x = _special_rows(randn(rng, 9, 1024, scale=3.0), 256)
    qs, d, bsums = native.quantize_act(x, True)
    q_ref, d_ref = q8_K_act(x)
    assert torch.equal(qs.long(), q_ref.reshape(9, -1))
    assert torch.equal(d, d_ref)
    assert torch.equal(bsums.long(), q_ref.reshape(9, -1, 16).sum(-1).reshape(9, -1))
    assert q_ref[2, 0, :8].tolist() == [-127, 0, 0, -2, -2, 2, -126, 126]  # round half to even


# -- numerics ----------------------------------------------------------------------------------------

# (N, K): K from one block to 4096; N tails of the 8-, 4-, 2-row tiles and of the threads' ranges.
SHAPES = [(1, 256), (7, 512), (9, 256), (37, 1024), (130, 2048), (67, 4096), (300, 768)]
ROWS = [1, 2, 3, 4, 5, 7, 16, 33]


def _check_exact(y: torch.Tensor, x: torch.Tensor, qw: torch.Tensor, name: str, bias: torch.Tensor | None = None,
                 emulated: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    exact, mag = emulated if emulated is not None else emulate(name, x, qw)
    if bias is not None:
        exact, mag = exact + bias.double(), mag + bias.double().abs()
    err = (y.double() - exact).abs()
    bound = 1e-5 * mag + 1e-30
    assert bool((err <= bound).all()), f"{name}: max error / magnitude {(err / (mag + 1e-30)).max().item():.3g}"


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("name", TYPES)
def test_matches_the_exact_emulation(native, name, n, k, isa, rng):
    """Every schedule (1..4 rows: GEMV tiles; more: GEMM tiles of 6 rows and their tails) agrees with
    llama.cpp's arithmetic done exactly, to fp32 rounding."""
    qw = random_qweight(name, n, k, rng)
    x = randn(rng, max(ROWS), k)
    exact, mag = emulate(name, x, qw)
    fn = kernel(name, isa)
    for m in ROWS:
        y = fn(x[:m], qw, out_f32=True)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _check_exact(y, x[:m], qw, name, emulated=(exact[:m], mag[:m]))


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [32, 64, 96, 160, 224])
@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_rows_of_few_blocks(native, name, k, isa, rng):
    """1..7 blocks: the VNNI tiles' groups of 4 blocks and their partial last group (masked loads)."""
    qw = random_qweight(name, 11, k, rng)
    x = randn(rng, 9, k)
    exact, mag = emulate(name, x, qw)
    for m in (1, 2, 4, 9):
        _check_exact(kernel(name, isa)(x[:m], qw, out_f32=True), x[:m], qw, name, emulated=(exact[:m], mag[:m]))


@requires_vnni
@pytest.mark.parametrize("name", ["q4k", "q5k", "q6k"])
def test_vnni_k_quants_are_the_avx2_results_bit_for_bit(native, name, rng):
    """Same integer lanes, folded to the AVX2 tile's 8 before the same fp32 steps: identical outputs."""
    qw = random_qweight(name, 45, 1024, rng)
    x = randn(rng, 37, 1024)
    for m in (1, 3, 4, 5, 37):
        assert torch.equal(kernel(name, "vnni")(x[:m], qw, out_f32=True), kernel(name, "avx2")(x[:m], qw, out_f32=True))


@requires_vnni
@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_vnni_q0_agree_with_avx2_to_rounding(native, name, rng):
    qw = random_qweight(name, 45, 1024, rng)
    x = randn(rng, 9, 1024)
    torch.testing.assert_close(kernel(name, "vnni")(x, qw, out_f32=True), kernel(name, "avx2")(x, qw, out_f32=True),
                               rtol=1e-5, atol=1e-5)


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_prefill_sized_batch_matches_the_emulation(native, name, isa, rng):
    qw = random_qweight(name, 45, 512, rng)
    x = randn(rng, 512, 512, scale=2.0)
    b = randn(rng, 45)
    _check_exact(kernel(name, isa)(x, qw, b, out_f32=True), x, qw, name, b)


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_close_to_f_linear_on_the_dequantized_weights(native, name, isa, rng):
    """The error of 8-bit activations only: q8_0 blocks of 32 (step amax/127) or q8_K blocks of 256."""
    qw = random_qweight(name, 96, 2048, rng)
    x = randn(rng, 24, 2048)
    y = kernel(name, isa)(x, qw, out_f32=True)
    ref = F.linear(x, gguf_dequant(name, qw))
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.015 if FORMATS[name][2] == "q8_0" else 0.025), rel


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_bias_dtypes_and_out_f32(native, name, isa, rng):
    fn = kernel(name, isa)
    qw = random_qweight(name, 37, 512, rng)
    x = randn(rng, 5, 512)
    for b in (randn(rng, 37), randn(rng, 37).to(torch.bfloat16)):
        y32 = fn(x, qw, b, out_f32=True)
        _check_exact(y32, x, qw, name, b.float())
        y = fn(x, qw, b)
        assert y.dtype == torch.float32 and torch.equal(y, y32)
        # bf16 input: the same result (x converts exactly), rounded once to bf16 unless out_f32
        xb = x.to(torch.bfloat16)
        yb32 = fn(xb, qw, b, out_f32=True)
        assert yb32.dtype == torch.float32 and torch.equal(yb32, fn(xb.float(), qw, b, out_f32=True))
        yb = fn(xb, qw, b)
        assert yb.dtype == torch.bfloat16 and torch.equal(yb, yb32.to(torch.bfloat16))
    # without a bias: x @ W^T alone; a zero row gives exactly the bias
    x[2] = 0.0
    b = randn(rng, 37)
    assert torch.equal(fn(x, qw, b, out_f32=True)[2], b)
    assert torch.equal(fn(x, qw)[2], torch.zeros(37))


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_leading_dims_and_strides(native, name, isa, rng):
    fn = kernel(name, isa)
    qw = random_qweight(name, 19, 256, rng)
    x3 = randn(rng, 2, 3, 256)
    y3 = fn(x3, qw)
    assert y3.shape == (2, 3, 19)
    assert torch.equal(y3.reshape(6, 19), fn(x3.reshape(6, 256), qw))
    wide = randn(rng, 4, 512)
    assert torch.equal(fn(wide[:, :256], qw), fn(wide[:, :256].contiguous(), qw))  # a row stride != K


# -- batch and thread-count invariance ----------------------------------------------------------------


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", [(67, 512), (21, 4608)])
@pytest.mark.parametrize("out_f32", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_rows_do_not_depend_on_the_batch(native, name, out_f32, n, k, isa, rng):
    """A row's output is bit-identical alone (GEMV), in small batches (GEMV with 2-4 rows), in any position
    of a larger batch (GEMM tiles of 6 rows and their tails) and in a 512-row prefill."""
    fn = kernel(name, isa)
    qw = random_qweight(name, n, k, rng)
    b = randn(rng, n)
    x = randn(rng, 512, k)
    full = fn(x, qw, b, out_f32=out_f32)
    alone = torch.cat([fn(x[i:i + 1], qw, b, out_f32=out_f32) for i in range(512)])
    assert torch.equal(full, alone)
    for m in (2, 3, 4, 5, 7, 16, 33, 37):
        for start in (0, 7, 512 - m):
            assert torch.equal(fn(x[start:start + m], qw, b, out_f32=out_f32), full[start:start + m]), (m, start)


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_results_do_not_depend_on_the_thread_count(native, name, isa, rng):
    """Work big enough to be split between threads (GEMV and GEMM) gives the same bits on 1 and 2 threads."""
    fn = kernel(name, isa)
    qw = random_qweight(name, 515, 1024, rng)
    x = randn(rng, 40, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [fn(x[:m], qw, out_f32=True) for m in (1, 3, 40)]
        torch.set_num_threads(2)
        two = [fn(x[:m], qw, out_f32=True) for m in (1, 3, 40)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(two[0], two[2][:1]) and torch.equal(two[1], two[2][:3])


# -- q4_0, q4_K and q5_K interleaved by 8 rows (the other layout of both instruction sets' tiles) ---------------

IL_SHAPES = {"q4_0": [(8, 32), (16, 96), (40, 256), (136, 1024), (24, 4096)],
             "q4k": [(8, 256), (16, 512), (40, 256), (136, 1024), (24, 4096)],
             "q5k": [(8, 256), (40, 512), (136, 1024)]}
IL_TYPES = sorted(interleave.TYPES)
# "emulated": the VNNI interleaved tiles with vpdpbusd emulated by AVX2 instructions (their logic, on any CPU)
IL_ISAS = [*ISAS, pytest.param("emulated", id="emulated")]


def il_kernel(name: str, isa: str):
    if isa != "emulated":
        return kernel(name, isa)
    qtype = cpu_quant.FORMATS[name][3]

    def fn(x, qweight, bias=None, *, out_f32=False):
        return ops.extension().qmatmul_vnni_emulated(x, qweight, bias, qtype, out_f32)
    return fn


def test_the_kernels_ask_for_their_layout():
    assert IL_TYPES == ["q4_0", "q4k", "q5k"]
    for name in IL_TYPES:
        assert kernel(name, "avx2").interleave == interleave.ROWS
        assert kernel(name, "vnni").interleave == interleave.ROWS
    for name in ("q8_0", "q6k"):
        assert not hasattr(kernel(name, "avx2"), "interleave") and not hasattr(kernel(name, "vnni"), "interleave")


@requires_avx2
@pytest.mark.parametrize("isa", IL_ISAS)
@pytest.mark.parametrize("name,n,k", [(name, n, k) for name in IL_TYPES for n, k in IL_SHAPES[name]])
def test_interleaved_matches_the_exact_emulation(native, name, n, k, isa, rng):
    """GEMV (1..4 rows of x) and GEMM tiles (4 or 8 rows of x and their tails) on W interleaved by 8 rows agree
    with llama.cpp's arithmetic done exactly, to fp32 rounding."""
    qw = random_qweight(name, n, k, rng)
    il = interleave.interleave(name, qw)
    x = randn(rng, max(ROWS), k)
    exact, mag = emulate(name, x, qw)
    for m in ROWS:
        y = il_kernel(name, isa)(x[:m], il, out_f32=True)
        assert y.shape == (m, n)
        _check_exact(y, x[:m], qw, name, emulated=(exact[:m], mag[:m]))


@requires_avx2
@pytest.mark.parametrize("isa", [isa for isa in IL_ISAS if isa.values[0] != "avx2"])
@pytest.mark.parametrize("name", IL_TYPES)
def test_interleaved_vnni_tiles_are_the_avx2_results_bit_for_bit(native, name, isa, rng):
    """The VNNI tiles form the same integers as the AVX2 ones (vpdpbusd instead of int16 runs) and share the float
    arithmetic, GEMV and GEMM tiles alike."""
    qw = interleave.interleave(name, random_qweight(name, 40, 1024, rng))
    x = randn(rng, 33, 1024)
    for m in (1, 2, 4, 7, 16, 33):
        assert torch.equal(il_kernel(name, isa)(x[:m], qw, out_f32=True), kernel(name, "avx2")(x[:m], qw, out_f32=True))


@requires_avx2
@pytest.mark.parametrize("name", IL_TYPES)
def test_the_native_interleave_is_the_layouts_bytes(native, name, rng):
    """`ggml_interleave` (C++, at load) writes what `interleave.interleave` (the layout's definition) does."""
    from mistralrs.nn.kernels import lookup_kernel

    assert lookup_kernel("ggml_interleave", "cpu") is ops.ggml_interleave
    threads = torch.get_num_threads()
    try:
        for n, k in ((8, 256), (40, 512), (1024, 2048)):
            qw = random_qweight(name, n, k, rng)
            want = interleave.interleave(name, qw)
            for t in (1, 2):
                torch.set_num_threads(t)
                got = ops.ggml_interleave(name, qw)
                assert got.shape == want.shape and torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(interleave.deinterleave(name, ops.ggml_interleave(name, qw)), qw)
    # what it does not take is the reference's: rows not a multiple of 8 (its error), another type
    with pytest.raises(ValueError):
        ops.ggml_interleave("q8_0", random_qweight("q8_0", 8, 64, rng))


@requires_avx2
@pytest.mark.parametrize("name", IL_TYPES)
def test_the_avx_vnni_op_gives_the_avx2_results_bit_for_bit(native, name, rng):
    """`qmatmul_avxvnni` (AVX-VNNI in the interleaved tiles where the CPU has it, else the AVX2 ones)."""
    ext = ops.extension()
    qtype = cpu_quant.FORMATS[name][3]
    il = interleave.interleave(name, random_qweight(name, 40, 1024, rng))
    canonical = random_qweight(name, 16, 1024, rng)
    x = randn(rng, 9, 1024)
    b = randn(rng, 40)
    for m in (1, 2, 3, 4, 5, 9):
        assert torch.equal(ext.qmatmul_avxvnni(x[:m], il, b, qtype, True), ext.qmatmul(x[:m], il, b, qtype, True))
        assert torch.equal(ext.qmatmul_avxvnni(x[:m], canonical, None, qtype, False),
                           ext.qmatmul(x[:m], canonical, None, qtype, False))


@requires_avx2
def test_interleaved_weights_take_the_avx_vnni_op_where_the_cpu_has_it(native, monkeypatch, rng):
    calls = []

    class Spy:
        def __getattr__(self, op):
            real = getattr(ops.extension(), op)
            return lambda *a: (calls.append(op), real(*a))[1]

    monkeypatch.setattr(ops, "_native", lambda: Spy())
    qw = random_qweight("q4k", 16, 256, rng)
    x = randn(rng, 2, 256)
    for avx_vnni in (False, True):
        monkeypatch.setattr(ops, "has_avx_vnni", lambda avx_vnni=avx_vnni: avx_vnni)
        ops.qmatmul_q4k(x, interleave.interleave("q4k", qw))
        ops.qmatmul_q4k(x, qw)
    assert calls == ["qmatmul", "qmatmul", "qmatmul_avxvnni", "qmatmul"]


@requires_avx2
@pytest.mark.parametrize("isa", IL_ISAS)
@pytest.mark.parametrize("name", IL_TYPES)
@pytest.mark.parametrize("out_f32", [False, True])
def test_interleaved_rows_do_not_depend_on_the_batch_or_threads(native, name, out_f32, isa, rng):
    fn = il_kernel(name, isa)
    qw = interleave.interleave(name, random_qweight(name, 72, 512, rng))
    b = randn(rng, 72)
    x = randn(rng, 300, 512)
    full = fn(x, qw, b, out_f32=out_f32)
    alone = torch.cat([fn(x[i:i + 1], qw, b, out_f32=out_f32) for i in range(300)])
    assert torch.equal(full, alone)
    for m in (2, 3, 4, 5, 9, 33):
        for start in (0, 7, 300 - m):
            assert torch.equal(fn(x[start:start + m], qw, b, out_f32=out_f32), full[start:start + m])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn(x, qw, b, out_f32=out_f32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


@requires_avx2
@pytest.mark.parametrize("isa", IL_ISAS)
@pytest.mark.parametrize("name", IL_TYPES)
def test_interleaved_bf16_outputs_are_the_fp32_ones_rounded(native, name, isa, rng):
    """Outputs in x's dtype (bf16) are the fp32 outputs plus bias, rounded to nearest even (the vectorized store)."""
    fn = il_kernel(name, isa)
    qw = interleave.interleave(name, random_qweight(name, 40, 512, rng))
    x = randn(rng, 9, 512).bfloat16()
    for b in (None, randn(rng, 40), randn(rng, 40).bfloat16()):
        for m in (1, 4, 9):
            y = fn(x[:m], qw, b)
            assert y.dtype == torch.bfloat16
            assert torch.equal(y, fn(x[:m], qw, b, out_f32=True).to(torch.bfloat16))


@requires_avx2
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", IL_TYPES)
def test_interleaved_inputs_the_kernel_does_not_take_give_the_references_result(native, name, isa, rng):
    """fp16 activations and autograd go to the reference, which takes the interleaved layout too."""
    qw = random_qweight(name, 16, 256, rng)
    il = interleave.interleave(name, qw)
    ref = ops.reference(f"qmatmul_{name}")
    for x in (randn(rng, 3, 256).half(), randn(rng, 3, 256).requires_grad_()):
        assert torch.equal(kernel(name, isa)(x, il), ref(x, qw))


# -- fallbacks ----------------------------------------------------------------------------------------


def _fake_reference(monkeypatch, calls: list):
    def ref(x, qweight, bias=None, *, out_f32=False):
        calls.append(tuple(x.shape))
        return torch.zeros(*x.shape[:-1], qweight.shape[0], dtype=torch.float32 if out_f32 else x.dtype)

    monkeypatch.setattr(ops, "reference", lambda op: ref)


@requires_avx2
def test_inputs_the_kernel_does_not_take_go_to_the_reference(native, monkeypatch, rng):
    calls: list = []
    _fake_reference(monkeypatch, calls)
    qw = random_qweight("q4_0", 8, 256, rng)
    ops.qmatmul_q4_0(randn(rng, 2, 256).half(), qw)  # fp16 activations
    ops.qmatmul_q4_0(randn(rng, 2, 256).requires_grad_(), qw)  # autograd
    ops.qmatmul_q4_0(randn(rng, 2, 250), qw)  # K not a multiple of the block
    ops.qmatmul_q4_0(randn(rng, 2, 256), qw[:, :-18].contiguous())  # row bytes not K's
    ops.qmatmul_q4_0(randn(rng, 2, 256), qw, randn(rng, 3))  # a bias of the wrong size
    assert len(calls) == 5
    ops.qmatmul_q4_0(randn(rng, 2, 256), qw)
    assert len(calls) == 5


@requires_avx2
def test_vnni_op_without_the_flags_is_the_reference(native, monkeypatch, rng):
    """The VNNI op never runs its tiles where the CPU lacks them: it is the reference there."""
    calls: list = []
    _fake_reference(monkeypatch, calls)
    monkeypatch.setattr(ops, "has_avx512_vnni", lambda: False)
    qw = random_qweight("q4k", 8, 256, rng)
    ops.qmatmul_q4k_vnni(randn(rng, 2, 256), qw)
    assert calls == [(2, 256)]


def _fresh_state(monkeypatch):
    monkeypatch.setattr(ops._lazy, "ext", None)
    monkeypatch.setattr(ops._lazy, "failed", None)
    monkeypatch.setattr(ops, "has_avx2", lambda: True)  # reach the build on any CPU


def _two_calls_one_warning(monkeypatch, rng) -> str:
    calls: list = []
    _fake_reference(monkeypatch, calls)
    qw = random_qweight("q8_0", 8, 64, rng)
    x = randn(rng, 3, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.qmatmul_q8_0(x, qw)
        ops.qmatmul_q8_0(x, qw, out_f32=True)
    native_warnings = [w for w in caught if issubclass(w.category, ops.NativeKernelWarning)]
    assert len(native_warnings) == 1, [str(w.message) for w in caught]
    assert native_warnings[0].filename == __file__  # points at the caller of the op
    assert calls == [(3, 64), (3, 64)]
    return str(native_warnings[0].message)


def test_fallback_when_disabled_by_env(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(cpu_quant.DISABLE_ENV, "1")
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build when disabled"))
    assert "MISTRALRS_NO_NATIVE_KERNELS" in _two_calls_one_warning(monkeypatch, rng)
    assert ops.status()["loaded"] is False


def test_fallback_when_the_build_raises(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)

    def broken():
        raise RuntimeError("Error building extension 'x'\nc++: error: no such compiler")

    monkeypatch.setattr(ops, "_builder", broken)
    assert "no such compiler" in _two_calls_one_warning(monkeypatch, rng)


def test_fallback_on_a_cpu_without_avx2(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "has_avx2", lambda: False)
    monkeypatch.setattr(ops, "_builder", lambda: pytest.fail("must not build for a CPU without avx2"))
    assert "avx2" in _two_calls_one_warning(monkeypatch, rng)


def test_fallback_when_there_is_no_compiler(monkeypatch, tmp_path, rng):
    """A real build attempt with a missing C++ compiler (into an empty cache) fails softly."""
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu_quant.DISABLE_ENV, raising=False)
    monkeypatch.setattr(ops, "cache_root", lambda: tmp_path)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    assert "no C++ compiler" in _two_calls_one_warning(monkeypatch, rng)
    assert ops.status()["failed"]


def test_the_registered_reference_is_what_the_fallback_calls():
    """Without a native build, the op is the reference registered for it (the GGML quantizer plugin's)."""
    from mistralrs.plugins import get_registry

    try:
        spec = get_registry().reference_kernel("qmatmul_q4_0")
    except Exception:  # noqa: BLE001 - the GGML quantizer plugin is not installed here
        pytest.skip("no reference registered for qmatmul_q4_0")
    from mistralrs.specs import resolve

    assert ops.reference("qmatmul_q4_0") is resolve(spec.impl)
