"""Importance-matrix (imatrix) weighted GGML quantization: ``formats.quantize(name, w, importance=v)``.

- ``importance=None`` is the reference quantizer, byte for byte (the pinned sha256 of llama.cpp's
  ``quantize_row_*_ref`` from test_ggml_formats), for every type; q8_0/q8_1/q8k ignore importance.
- With a skewed importance vector the importance-weighted squared error is lower than without,
  per type (what llama.cpp's weighting is for); with a uniform one the blocks are valid and the
  error is close to the reference's (a little lower: the weighted searches are finer).
- The weighting is homogeneous: importance times a power of two gives the same bytes.
- Tiling, input dtypes and layouts do not change the bytes; bad importance vectors are refused.
- With ``LLAMA_CPP_SRC`` pointing at a llama.cpp source tree and gcc installed, llama.cpp's own
  ``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)`` is built (``ggml-quants.c``, plain
  ``-O2``: no FMA contraction) and compared: at least 99% identical blocks per type and the same
  dequantized RMSE within 0.1% (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mistralrs_plugins.quant.ggml import formats as F
from mistralrs_plugins.quant.ggml.formats import FORMATS, dequantize, quantize

from .test_ggml_formats import C_SHA256, _edge_matrices, pinned_matrix

WEIGHTED = ["q4_0", "q4_1", "q5_0", "q5_1", "q2k", "q3k", "q4k", "q5k", "q6k"]
IGNORED = ["q8_0", "q8_1", "q8k"]


def _gaussian(rows: int, cols: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32))


def _skewed(cols: int, seed: int, sigma: float = 2.0) -> torch.Tensor:
    """Log-normal importance: a few columns matter far more than most, as in real imatrix files."""
    return torch.from_numpy(np.exp(np.random.default_rng(seed).standard_normal(cols) * sigma).astype(np.float32))


def _roundtrip(name: str, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    return dequantize(name, quantize(name, x, importance=importance), x.shape[-1])


# ---------------------------------------------------------------------------- no importance: unchanged


@pytest.mark.parametrize("name", list(FORMATS))
def test_none_is_the_reference_bytes(name):
    x = torch.from_numpy(pinned_matrix())
    q = quantize(name, x, importance=None)
    assert hashlib.sha256(q.numpy().tobytes()).hexdigest() == C_SHA256[name]
    assert torch.equal(q, quantize(name, x))


@pytest.mark.parametrize("name", IGNORED)
def test_q8_types_ignore_importance(name):
    x = _gaussian(8, 512, seed=1, scale=0.05)
    assert torch.equal(quantize(name, x, importance=_skewed(512, seed=2)), quantize(name, x))


# ---------------------------------------------------------------------------- what the weighting buys


@pytest.mark.parametrize("name", WEIGHTED)
def test_skewed_importance_lowers_the_weighted_error(name):
    cols = 2048
    x = _gaussian(48, cols, seed=10 + FORMATS[name].ggml_type)
    imp = _skewed(cols, seed=20 + FORMATS[name].ggml_type)
    e_ref = (_roundtrip(name, x) - x).double().pow(2)
    e_imp = (_roundtrip(name, x, imp) - x).double().pow(2)
    w = imp.double()
    ratio = float((e_imp * w).sum() / (e_ref * w).sum())
    assert ratio < 0.75, ratio  # measured 0.25 (q2k) .. 0.52 (q5_0)
    # the unweighted error pays only a little for it
    assert float(e_imp.mean() / e_ref.mean()) ** 0.5 < 1.25


@pytest.mark.parametrize("name", WEIGHTED)
def test_uniform_importance_is_close_to_the_reference(name):
    cols = 1024
    x = _gaussian(32, cols, seed=30 + FORMATS[name].ggml_type, scale=0.02)
    q = quantize(name, x, importance=torch.ones(cols))
    y = dequantize(name, q, cols)
    assert q.shape == quantize(name, x).shape and bool(torch.isfinite(y).all())
    # a valid block encoding: gguf-py reads our blocks as we do
    gguf = pytest.importorskip("gguf")
    ref_dq = gguf.quants.dequantize(q.numpy(), gguf.GGMLQuantizationType(FORMATS[name].ggml_type))
    assert np.array_equal(y.numpy().view(np.uint32), np.ascontiguousarray(ref_dq, np.float32).view(np.uint32))
    r_imp = float((y - x).double().pow(2).mean().sqrt())
    r_ref = float((_roundtrip(name, x) - x).double().pow(2).mean().sqrt())
    assert 0.85 * r_ref <= r_imp <= 1.02 * r_ref, (r_imp, r_ref)  # measured 0.89 .. 1.00


@pytest.mark.parametrize("name", WEIGHTED)
def test_importance_scale_by_power_of_two_is_exact(name):
    x = _gaussian(8, 512, seed=4, scale=0.05)
    imp = _skewed(512, seed=5)
    assert torch.equal(quantize(name, x, importance=imp), quantize(name, x, importance=imp * 4.0))


@pytest.mark.parametrize("name", WEIGHTED)
def test_edge_cases(name):
    cols = 512
    imps = {"skewed": _skewed(cols, seed=6), "zeros": torch.zeros(cols), "some_zero": _skewed(cols, seed=7) * (torch.arange(cols) % 3 != 0),
            "huge": _skewed(cols, seed=8) * 1e6, "tiny": _skewed(cols, seed=9) * 1e-12}
    for label, xnp in _edge_matrices(cols).items():
        x = torch.from_numpy(xnp)
        for il, imp in imps.items():
            y = _roundtrip(name, x, imp)
            assert y.shape == x.shape
            if label == "zeros":
                assert not y.any(), (label, il)
            if label not in ("large", "one_huge", "subnormal"):
                assert bool(torch.isfinite(y).all()), (label, il)
            if label in ("gaussian", "uniform", "negative_only", "positive_only") and il not in ("zeros",):
                err = float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
                assert err < 0.7, (label, il, err)


# ---------------------------------------------------------------------------- the entry point


def test_bad_importance_is_refused():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"q4k.*\[256\]"):
        quantize("q4k", x, importance=torch.ones(128))
    with pytest.raises(ValueError, match=r"\[256\]"):
        quantize("q4_0", x, importance=torch.ones(4, 256))
    with pytest.raises(ValueError, match=">= 0"):
        quantize("q4k", x, importance=-torch.ones(256))
    with pytest.raises(ValueError, match="finite"):
        quantize("q6k", x, importance=torch.full((256,), float("nan")))
    with pytest.raises(ValueError, match="dequantize-only"):
        quantize("iq4_xs", x, importance=torch.ones(256))


@pytest.mark.parametrize("name", WEIGHTED)
def test_tiling_dtypes_and_layouts_do_not_change_bytes(name, monkeypatch):
    bs = FORMATS[name].block_size
    cols = 6 * bs if bs == 256 else 40 * bs
    x = _gaussian(5, cols, seed=12, scale=0.1)
    imp = _skewed(cols, seed=13)
    ref = quantize(name, x, importance=imp)
    assert torch.equal(quantize(name, x.double(), importance=imp.double()), ref)
    assert torch.equal(quantize(name, x.t().contiguous().t(), importance=imp), ref)
    wide = torch.zeros(5, 2 * cols)
    wide[:, ::2] = x
    assert torch.equal(quantize(name, wide[:, ::2], importance=torch.stack([imp, imp], 1)[:, 0]), ref)
    q3 = quantize(name, x.reshape(5, 1, cols).expand(5, 2, cols), importance=imp)  # leading dims kept
    assert q3.shape == (5, 2, ref.shape[1]) and torch.equal(q3[:, 1], ref)
    xb = x.to(torch.bfloat16)
    assert torch.equal(quantize(name, xb, importance=imp), quantize(name, xb.float(), importance=imp))
    before = x.clone()
    quantize(name, x, importance=imp)
    assert torch.equal(x, before)
    for tile in (bs * 4, bs * 64):  # rows split across column tiles; many rows per tile
        monkeypatch.setitem(F._IMATRIX_TILE, name, tile)
        assert torch.equal(quantize(name, x, importance=imp), ref)


def test_worker_threads_give_the_same_bytes():
    saved = torch.get_num_threads()
    x = _gaussian(256, 1024, seed=14, scale=0.05)
    imp = _skewed(1024, seed=15)
    try:
        torch.set_num_threads(1)
        one = {n: quantize(n, x, importance=imp) for n in ("q4k", "q4_0")}
        torch.set_num_threads(2)
        for n, q in one.items():
            assert torch.equal(quantize(n, x, importance=imp), q)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------------------- llama.cpp's C code


@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory):
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("set LLAMA_CPP_SRC to a llama.cpp source tree to compare with its C quantizers")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build llama.cpp's ggml-quants.c")
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "ggml_rmse.py"
    spec = importlib.util.spec_from_file_location("ggml_rmse_bench_imatrix", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod, mod.build_reference(src, tmp_path_factory.mktemp("ggmlq_imatrix"))


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.mark.parametrize("name", WEIGHTED + ["q8_0"])
def test_matches_llama_cpp_quant_weights(name, llama_cpp):
    mod, lib = llama_cpp
    fmt = FORMATS[name]
    gauss = _gaussian(128, 2048, seed=40, scale=0.02).to(torch.bfloat16).float().numpy()  # bf16 values, as models arrive
    cases = {
        "gaussian": (gauss, _skewed(2048, seed=41, sigma=1.5).numpy()),
        "gaussian_sparse_importance": (gauss[:32], (_skewed(2048, seed=42) * (torch.arange(2048) % 5 != 0)).numpy()),
        "pinned": (pinned_matrix(), _skewed(1024, seed=43).numpy()),
        **{f"edge_{k}": (v, _skewed(512, seed=44).numpy()) for k, v in _edge_matrices(512).items()},
    }
    for label, (x, imp) in cases.items():
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            ref = mod.c_quantize_imatrix(lib, name, x, imp, fmt.type_size, fmt.block_size)
        ours = quantize(name, torch.from_numpy(x), importance=torch.from_numpy(imp)).numpy()
        same = (ours.reshape(-1, fmt.type_size) == ref.reshape(-1, fmt.type_size)).all(1)
        assert same.mean() >= 0.99, f"{name} {label}: {same.mean():.2%} of blocks identical to llama.cpp's"
        if label.startswith("edge_") and label not in ("edge_gaussian", "edge_uniform"):
            continue
        r_c = _rmse(dequantize(name, torch.from_numpy(ref), x.shape[1]).numpy(), x)
        r_ours = _rmse(dequantize(name, torch.from_numpy(ours), x.shape[1]).numpy(), x)
        assert abs(r_ours - r_c) <= 1e-3 * r_c, (label, r_ours, r_c)
