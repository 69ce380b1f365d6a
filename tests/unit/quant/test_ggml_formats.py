"""GGML block formats (`mistralrs_plugins.quant.ggml.formats`) against llama.cpp.

- Dequantization is bit-exact with gguf-py (``gguf.quants.dequantize``) for every type it has,
  on random valid blocks and on our own blocks; Q8_1 and Q8_K against a numpy transcription of
  llama.cpp's block structs and ``dequantize_row_*``.
- Quantization of Q4_0..Q8_0 is bit-exact with gguf-py's ``quantize``.
- Every type's bytes are pinned to llama.cpp's C reference (``quantize_row_*_ref``) on a
  deterministic matrix: the sha256 constants below were measured on the C code, and the RMSE
  constants are llama.cpp's round-trip RMSE on that matrix (ours must be within 3%).
- With ``LLAMA_CPP_SRC`` pointing at a llama.cpp source tree and gcc installed, the C reference
  is built and compared on a fresh random matrix as well (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from mistralrs_plugins.quant.ggml import formats as F
from mistralrs_plugins.quant.ggml.formats import FORMATS, BlockFormat, dequantize, quantize, row_bytes

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402

ALL = list(FORMATS)
GGUF_DEQUANT = {"q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q5_0": GT.Q5_0, "q5_1": GT.Q5_1, "q8_0": GT.Q8_0,
                "q2k": GT.Q2_K, "q3k": GT.Q3_K, "q4k": GT.Q4_K, "q5k": GT.Q5_K, "q6k": GT.Q6_K}
GGUF_QUANT = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
# byte offsets of each block's fp16 fields (d, m/dmin/s)
FP16_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0], "q8_1": [0, 2],
               "q2k": [80, 82], "q3k": [108], "q4k": [0, 2], "q5k": [0, 2], "q6k": [208]}


def pinned_matrix() -> np.ndarray:
    """A deterministic float32 matrix [32, 1024] from integer arithmetic and exact float64 steps only
    (splitmix64, no RNG library, no libm), so its values, and the pinned hashes, are the same on
    every platform. Rows 0-23 are gaussian-like with heavier tails (the RMSE rows); rows 24-31 are
    edge cases: zeros, a constant, negative-only, one huge value, tiny and subnormal, large, sparse,
    a ramp."""
    rows, cols = 32, 1024
    idx = np.arange(rows * cols * 5, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = idx * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(40)).astype(np.float64) / 2.0**24).reshape(5, rows, cols)  # exact k / 2^24
    g = (u[0] + u[1] + u[2] + u[3] - 2.0) * (1.0 + 3.0 * u[4] ** 3) * 0.03
    x = g.astype(np.float32)
    x[24] = 0.0
    x[25] = 0.0123
    x[26] = -np.abs(x[26])
    x[27, 300] = 1.0e4
    x[28, :512] *= np.float32(2.0**-100)
    x[28, 512:] *= np.float32(2.0**-130)  # float32 subnormals: scales overflow to inf
    x[29] *= np.float32(3.0e3)
    x[30, 1::3] = 0.0
    x[30, 2::3] = 0.0
    x[31] = (np.arange(cols) - 512).astype(np.float32) / 64.0
    return x


PINNED_RMSE_ROWS = 24

# Measured on llama.cpp's C reference (ggml-quants.c of llama-cpp-python 0.3.36's vendored
# llama.cpp, gcc -O2, x86-64 without FMA) with `benchmarks/ggml_rmse.py --pin`: the sha256 of
# quantize_row_*_ref's bytes for pinned_matrix(), and the RMSE of its round trip over rows 0-23.
C_SHA256: dict[str, str] = {
    "q4_0": "3997beda0beea6919b1acb9d216a8afac1544515c541578c26f868bec367529a",
    "q4_1": "859683401d6b3afdce823eaef2dd083dd5722cb45a7714c7040bd9ca02b6aa9e",
    "q5_0": "989c2dba6bc454344fc4d17924f8e4e5dad101e01ad272f786cdf871fc4255c6",
    "q5_1": "0b535d9e7b033bba63c3b99158cd846cf4465c7c27295d390abc0cb3aa1284ad",
    "q8_0": "61795c086a4f23f986043155d71b38d7174a4ee646a1dbbaa14bd291fb51db35",
    "q8_1": "1bb27ba6b6289e901f01e23879f519cb22c7ddeb7f82e70ef316860758c8ac81",
    "q2k": "5af95489c95ee3d5543bfe89c2fe2d790be6ac728dfd957cbfcc1164741d52db",
    "q3k": "2640f08c00244e86e20ae6e3e727deb646e8523ecf3ea3418181cd36447accd7",
    "q4k": "536dc5af6cfc50cda274a5d83d5a7ff3338063f0971866cc80423eafeb3bbe1b",
    "q5k": "3d1438bfba77a493ae41652964b6c372381c1f50ff73e932dae12f9442ebcb1a",
    "q6k": "610150ede412889f4c5f6728bf9fdcf969346dd3feb26b1062ef7962df630449",
    "q8k": "0cfc9d9c0253af0cd92469257b747b088b97ee7761ec3344dfad8bc35fac6f35",
}
C_RMSE: dict[str, float] = {
    "q4_0": 3.517352e-03,
    "q4_1": 3.010965e-03,
    "q5_0": 1.750884e-03,
    "q5_1": 1.456101e-03,
    "q8_0": 2.205667e-04,
    "q8_1": 2.205667e-04,
    "q2k": 1.123495e-02,
    "q3k": 5.855179e-03,
    "q4k": 2.782430e-03,
    "q5k": 1.397252e-03,
    "q6k": 7.057297e-04,
    "q8k": 3.136658e-04,
}


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _gaussian(rows: int, cols: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


def _edge_matrices(cols: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    g = rng.standard_normal((4, cols)).astype(np.float32)
    one_huge = g.copy()
    one_huge[:, 5] = 1.0e4
    one_huge[1, 77 % cols] = -3.0e4
    mixed = np.zeros((6, cols), np.float32)
    mixed[1] = 1.0
    mixed[2] = -2.5
    mixed[3, ::2] = 0.5
    mixed[4] = np.round(rng.standard_normal(cols) * 4)
    mixed[5, :: max(1, cols // 8)] = 7.0
    return {
        "gaussian": g,
        "zeros": np.zeros((3, cols), np.float32),
        "constants": mixed,
        "negative_only": -np.abs(g),
        "positive_only": np.abs(g),
        "tiny": g * np.float32(1e-20),
        "subnormal": g * np.float32(1e-39),
        "large": g * np.float32(1e4),
        "one_huge": one_huge,
        "uniform": rng.uniform(-1, 1, (4, cols)).astype(np.float32),
    }


def _random_valid_blocks(name: str, nblocks: int, seed: int) -> np.ndarray:
    """Random bytes with the scale fields set to sane finite values."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (nblocks, fmt.type_size), dtype=np.uint8)
    for off in FP16_FIELDS.get(name, []):
        b[:, off:off + 2] = (rng.standard_normal(nblocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if name == "q8k":
        b[:, 0:4] = (rng.standard_normal(nblocks) * 0.01).astype(np.float32).view(np.uint8).reshape(-1, 4)
    return b


def _np_dequant_q8(name: str, blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's block_q8_1 (fp16 d, fp16 s, int8 qs[32]) and block_q8_K (float d, int8 qs[256],
    int16 bsums[16]) read as dequantize_row_q8_K does: y = d * q (q8_1: the same with its d)."""
    if name == "q8_1":
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 4:36].copy().view(np.int8).astype(np.float32)
    else:
        d = blocks[:, 0:4].copy().view(np.float32)
        q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return d * q


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


# ---------------------------------------------------------------------------- API


def test_formats_match_ggml():
    assert set(FORMATS) == {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2k", "q3k", "q4k", "q5k", "q6k", "q8k"}
    expected = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q8_1": 9,
                "q2k": 10, "q3k": 11, "q4k": 12, "q5k": 13, "q6k": 14, "q8k": 15}
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, BlockFormat) and fmt.name == name
        assert fmt.ggml_type == expected[name]
        if name == "q8_1":  # gguf-py still says 4 + 4 + 32 (float d and s); ggml-common.h has fp16 d, s
            assert (fmt.block_size, fmt.type_size) == (32, 2 + 2 + 32)
        else:
            assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[GT(fmt.ggml_type)]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        FORMATS["q4k"].block_size = 1  # type: ignore[misc]


def test_row_bytes_and_errors():
    assert row_bytes("q4k", 2048) == 8 * 144
    assert row_bytes("q8_0", 64) == 2 * 34
    with pytest.raises(ValueError, match=r"q4k.*256"):
        row_bytes("q4k", 100)
    with pytest.raises(ValueError, match=r"q4_0.*32"):
        quantize("q4_0", torch.zeros(2, 48))
    with pytest.raises(ValueError, match=r"q6k.*256"):
        quantize("q6k", torch.zeros(2, 512 + 32))
    with pytest.raises(ValueError, match="unknown"):
        quantize("q4_2", torch.zeros(2, 32))
    with pytest.raises(ValueError, match="q4k"):
        dequantize("q4k", torch.zeros(2, 143, dtype=torch.uint8), 256)
    with pytest.raises(ValueError):
        quantize("q8_0", torch.zeros(2, 32, dtype=torch.int32))


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes(name):
    bs = FORMATS[name].block_size
    x = torch.randn(3, 2 * bs)
    q = quantize(name, x)
    assert q.dtype == torch.uint8 and q.shape == (3, row_bytes(name, 2 * bs))
    y = dequantize(name, q, 2 * bs)
    assert y.dtype == torch.float32 and y.shape == (3, 2 * bs)
    yb = dequantize(name, q, 2 * bs, dtype=torch.bfloat16)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    q3 = quantize(name, x.reshape(3, 1, 2 * bs).expand(3, 2, 2 * bs))  # leading dims are kept
    assert q3.shape == (3, 2, q.shape[1]) and torch.equal(q3[:, 1], q)
    assert dequantize(name, q3, 2 * bs).shape == (3, 2, 2 * bs)


# ---------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", list(GGUF_DEQUANT))
def test_dequantize_matches_gguf_on_random_blocks(name):
    fmt = FORMATS[name]
    blocks = _random_valid_blocks(name, 512, seed=fmt.ggml_type)
    cols = fmt.block_size * 8
    data = blocks.reshape(-1, cols // fmt.block_size * fmt.type_size)
    ref = gguf.quants.dequantize(data, GGUF_DEQUANT[name])
    ours = dequantize(name, torch.from_numpy(data), cols).numpy()
    assert _same_bits(ours, ref)


@pytest.mark.parametrize("name", ["q8_1", "q8k"])
def test_dequantize_q8_1_q8_k_on_random_blocks(name):
    fmt = FORMATS[name]
    blocks = _random_valid_blocks(name, 256, seed=fmt.ggml_type)
    ours = dequantize(name, torch.from_numpy(blocks.reshape(16, -1)), 16 * fmt.block_size).numpy()
    assert _same_bits(ours.reshape(-1, fmt.block_size), _np_dequant_q8(name, blocks))


@pytest.mark.parametrize("name", ALL)
def test_dequantize_own_blocks(name):
    fmt = FORMATS[name]
    x = _gaussian(16, 4 * fmt.block_size, seed=3, scale=0.05)
    q = quantize(name, torch.from_numpy(x)).numpy()
    ours = dequantize(name, torch.from_numpy(q), x.shape[1]).numpy()
    if name in GGUF_DEQUANT:
        ref = gguf.quants.dequantize(q, GGUF_DEQUANT[name])
    else:
        ref = _np_dequant_q8(name, q.reshape(-1, fmt.type_size)).reshape(x.shape)
    assert _same_bits(ours, ref)


def test_q8_1_sum_and_q8_k_bsums():
    """Q8_1's s is fp16(sum(q) * d); Q8_K's bsums are the int16 sums of each 16 values."""
    x = _gaussian(4, 512, seed=11)
    q = quantize("q8_1", torch.from_numpy(x)).numpy().reshape(-1, 36)
    d = np.abs(x.reshape(-1, 32)).max(1) / np.float32(127)  # the float d, before its fp16 rounding
    qs = q[:, 4:36].copy().view(np.int8).astype(np.int32)
    assert np.array_equal(q[:, 2:4].copy().view(np.float16)[:, 0], (qs.sum(1).astype(np.float32) * d).astype(np.float16))
    k = quantize("q8k", torch.from_numpy(x)).numpy().reshape(-1, 292)
    qs = k[:, 4:260].copy().view(np.int8).astype(np.int32)
    assert np.array_equal(k[:, 260:292].copy().view(np.int16), qs.reshape(-1, 16, 16).sum(-1).astype(np.int16))
    assert np.abs(qs).max() == 127


# ---------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("name", GGUF_QUANT)
def test_quantize_matches_gguf(name):
    mats = {"gauss": _gaussian(8, 256, seed=1), "gauss_small": _gaussian(8, 256, seed=2, scale=1e-3),
            **_edge_matrices(256)}
    for label, x in mats.items():
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            ref = gguf.quants.quantize(x, GGUF_DEQUANT[name])
        ours = quantize(name, torch.from_numpy(x)).numpy()
        assert np.array_equal(ours, ref), f"{name} differs from gguf-py on {label}"


def _sha(name: str, x: np.ndarray) -> str:
    return hashlib.sha256(quantize(name, torch.from_numpy(x)).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", ALL)
def test_bytes_match_llama_cpp_reference(name):
    """The bytes are llama.cpp's quantize_row_*_ref's (pinned sha256, measured on the C code)."""
    assert _sha(name, pinned_matrix()) == C_SHA256[name]


@pytest.mark.parametrize("name", ALL)
def test_rmse_within_3_percent_of_llama_cpp(name):
    x = pinned_matrix()[:PINNED_RMSE_ROWS]
    ours = dequantize(name, quantize(name, torch.from_numpy(x)), x.shape[1]).numpy()
    assert _rmse(ours, x) <= C_RMSE[name] * 1.03


@pytest.mark.parametrize("name", ALL)
def test_edge_cases(name):
    fmt = FORMATS[name]
    cols = 2 * fmt.block_size
    for label, x in _edge_matrices(cols).items():
        q = quantize(name, torch.from_numpy(x))
        y = dequantize(name, q, cols).numpy()
        if label == "zeros":
            assert not q.any() or name in ("q4_0", "q5_0"), label  # q4_0/q5_0 store d = -0.0
            assert not y.any(), label
        if label in ("gaussian", "negative_only", "positive_only", "uniform", "constants"):
            err = _rmse(y, x) / max(_rmse(x, np.zeros_like(x)), 1e-30)
            assert err < 0.7, (label, err)
        assert np.isfinite(y).all() or label in ("large", "one_huge", "subnormal"), label


@pytest.mark.parametrize("name", ALL)
def test_input_dtypes_and_layouts(name):
    bs = FORMATS[name].block_size
    x = torch.randn(6, 3 * bs) * 0.1
    ref = quantize(name, x)
    xb = x.to(torch.bfloat16)
    assert torch.equal(quantize(name, xb), quantize(name, xb.float()))
    assert torch.equal(quantize(name, x.half()), quantize(name, x.half().float()))
    assert torch.equal(quantize(name, x.double()), ref)
    # non-contiguous: a transposed view and a strided slice
    assert torch.equal(quantize(name, x.t().contiguous().t()), ref)
    wide = torch.zeros(6, 2 * 3 * bs)
    wide[:, ::2] = x
    assert torch.equal(quantize(name, wide[:, ::2]), ref)
    # read-only memory (a mmapped checkpoint) is only read
    buf = bytes(x.numpy().tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ro = torch.frombuffer(buf, dtype=torch.float32).reshape(x.shape)
    assert torch.equal(quantize(name, ro), ref)
    before = x.clone()
    quantize(name, x)
    assert torch.equal(x, before)
    assert torch.equal(quantize(name, torch.nn.Parameter(x)), ref)


@pytest.mark.parametrize("name", ["q4_0", "q8_1", "q3k", "q6k"])
def test_tiling_does_not_change_bytes(name, monkeypatch):
    """Rows wider than a tile are split across columns; many rows share a tile."""
    bs = FORMATS[name].block_size
    x = torch.from_numpy(_gaussian(5, 6 * bs, seed=5, scale=0.1))
    ref = quantize(name, x)
    ref_dq = dequantize(name, ref, x.shape[1])
    for tile in (bs * 4, bs * 64) if name in ("q4_0", "q8_1") else (bs * 4,):
        monkeypatch.setitem(F._QUANT_TILE, name, tile)
        monkeypatch.setattr(F, "_DEQUANT_TILE", tile)
        assert torch.equal(quantize(name, x), ref)
        assert torch.equal(dequantize(name, ref, x.shape[1]), ref_dq)


def test_threads_restored_and_concurrent_calls():
    """quantize turns torch's intra-op threads off while it runs (its tiles go to worker threads)
    and restores them; concurrent calls share that and give the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.from_numpy(_gaussian(64, 1024, seed=9, scale=0.05))
        ref = {name: quantize(name, x) for name in ("q4k", "q8_0")}
        assert torch.get_num_threads() == 2
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda n: (n, quantize(n, x)), ["q4k", "q8_0", "q4k", "q8_0"]))
        assert all(torch.equal(q, ref[n]) for n, q in outs)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.equal(quantize("q4k", x), ref["q4k"])
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- the C code itself


@pytest.fixture(scope="module")
def llama_cpp_reference(tmp_path_factory):
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("set LLAMA_CPP_SRC to a llama.cpp source tree to compare with its C reference")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build llama.cpp's ggml-quants.c")
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "ggml_rmse.py"
    spec = importlib.util.spec_from_file_location("ggml_rmse_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod, mod.build_reference(src, tmp_path_factory.mktemp("ggmlq"))


@pytest.mark.parametrize("name", ALL)
def test_bit_exact_with_llama_cpp_c_code(name, llama_cpp_reference):
    mod, lib = llama_cpp_reference
    fmt = FORMATS[name]
    mats = {"gaussian": _gaussian(16, 1024, seed=123, scale=0.02), "pinned": pinned_matrix(), **_edge_matrices(512)}
    for label, x in mats.items():
        ref = mod.c_quantize(lib, name, x, fmt.type_size, fmt.block_size)
        ours = quantize(name, torch.from_numpy(x)).numpy()
        assert np.array_equal(ours, ref), f"{name} differs from llama.cpp on {label}"
        cdq = mod.c_dequantize(lib, name, ref, x.shape[1])
        if cdq is not None:
            assert _same_bits(dequantize(name, torch.from_numpy(ref), x.shape[1]).numpy(), cdq), label


def test_dequantize_on_worker_threads_under_inference_mode():
    """The engine runs forwards under torch.inference_mode: a quantized embedding's row lookup
    (many rows, several tiles on worker threads) must work there."""
    import torch

    from mistralrs_plugins.quant.ggml.formats import dequantize, quantize

    w = torch.randn(4096, 256)
    q = quantize("q4_0", w)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = dequantize("q4_0", q, 256)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(got, dequantize("q4_0", q, 256))
