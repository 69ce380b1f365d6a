"""The dequantize-only GGML types of GGUF files (i-quants, TQ1_0/TQ2_0, MXFP4) in the ggml plugin.

- Dequantization is bit-exact with gguf-py (``gguf.quants.dequantize``) on random valid blocks,
  for every type, over several rows and across tiles.
- The lattice tables (`iq_tables`) are gguf-py's (which are llama.cpp's): compared by sha256.
- Registration: one ``isq=False`` QuantizerSpec per type with its GGML type id, found by
  ``quantizer_for_ggml_type``; ``--isq`` refuses them and never lists them.
- `GgmlLinearMethod` takes their blocks from ``load_ggml`` and computes ``F.linear(x, W)`` with the
  dequantized W; ``dequantize_rows`` reads table rows; ``quantize`` says the type is dequantize-only.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mistralrs.errors import ConfigError
from mistralrs.nn.linear import Linear
from mistralrs.plugins import get_registry
from mistralrs.quantization import isq_type_names, make_method, resolve_isq_type
from mistralrs_plugins.quant.ggml import DEQUANT_ONLY_TYPES, GGML_TYPE_IDS, TYPES, iq_tables, iquants, reference
from mistralrs_plugins.quant.ggml import formats as FM
from mistralrs_plugins.quant.ggml.formats import DEQUANT_ONLY_FORMATS, FORMATS, dequantize, quantize, row_bytes
from mistralrs_plugins.quant.ggml.method import GgmlLinearMethod

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants as Q  # noqa: E402

NAMES = list(DEQUANT_ONLY_TYPES)
# byte offsets of each block's plain fp16 fields (IQ1_M's d is spread over nibbles; MXFP4 has an e8m0)
FP16_FIELDS = {"iq2_xxs": 0, "iq2_xs": 0, "iq2_s": 0, "iq3_xxs": 0, "iq3_s": 0, "iq1_s": 0, "iq4_nl": 0,
               "iq4_xs": 0, "tq1_0": 52, "tq2_0": 64}
# finite fp16 scales worth a look besides random normals: zeros, subnormals, the largest
SPECIAL_D = np.array([0.0, -0.0, 2.0**-24, -(2.0**-24), 6.1e-5, 65504.0, -65504.0, 1.0], dtype=np.float16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared machine
    yield
    torch.set_num_threads(saved)


def _gt(name: str) -> GT:
    return GT[name.upper()]


def random_blocks(name: str, nblocks: int, seed: int) -> np.ndarray:
    """Random block bytes with a finite fp16 scale (random normals, one block in four a special value)."""
    fmt = DEQUANT_ONLY_FORMATS[name]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (nblocks, fmt.type_size), dtype=np.uint8)
    d = (rng.standard_normal(nblocks) * 0.01).astype(np.float16)
    special = rng.random(nblocks) < 0.25
    d[special] = rng.choice(SPECIAL_D, int(special.sum()))
    if name in FP16_FIELDS:
        off = FP16_FIELDS[name]
        b[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    elif name == "iq1_m":  # d's 4 nibbles are the top nibbles of the 4 uint16 scale words
        bits = d.view(np.uint16)
        words = b[:, 48:56].copy().view(np.uint16).reshape(nblocks, 4) & np.uint16(0x0FFF)
        for j in range(4):
            words[:, j] |= ((bits >> np.uint16(4 * j)) & np.uint16(0xF)) << np.uint16(12)
        b[:, 48:56] = words.view(np.uint8).reshape(nblocks, 8)
    # mxfp4: every e8m0 exponent is valid (e = 0, 1: subnormal scales; large e: products overflow to inf)
    return b


def _gguf_dequantize(name: str, data: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mxfp4's e = 254, 255 overflow, as in C
        with np.errstate(all="ignore"):
            return gguf.quants.dequantize(data, _gt(name))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def _data(name: str, rows: int, blocks_per_row: int, seed: int) -> tuple[np.ndarray, int]:
    fmt = DEQUANT_ONLY_FORMATS[name]
    b = random_blocks(name, rows * blocks_per_row, seed)
    return b.reshape(rows, blocks_per_row * fmt.type_size), blocks_per_row * fmt.block_size


# ---------------------------------------------------------------------------- the types and tables


def test_the_types_are_ggmls():
    assert set(NAMES) == {"iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "iq1_m",
                          "tq1_0", "tq2_0", "mxfp4"}
    assert set(DEQUANT_ONLY_FORMATS) == set(NAMES) == set(iquants.IQ_TYPES) == set(iquants.DEQUANTIZE)
    assert not set(NAMES) & set(FORMATS)  # FORMATS stays the quantizable types
    for name, (bpw, type_id, block) in DEQUANT_ONLY_TYPES.items():
        fmt = DEQUANT_ONLY_FORMATS[name]
        assert type_id == int(_gt(name)) == fmt.ggml_type == GGML_TYPE_IDS[name]
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[_gt(name)]
        assert block == fmt.block_size
        assert bpw == fmt.type_size * 8 / fmt.block_size
        assert FM.ALL_FORMATS[name] is fmt
    assert {n: int(_gt(n)) for n in NAMES} == {  # ggml.h's enum ggml_type, as gguf 0.19 has it
        "iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq4_nl": 20, "iq3_s": 21, "iq2_s": 22,
        "iq4_xs": 23, "iq1_m": 29, "tq1_0": 34, "tq2_0": 35, "mxfp4": 39}


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("table,cls", [("iq2xxs", "IQ2_XXS"), ("iq2xs", "IQ2_XS"), ("iq2s", "IQ2_S"),
                                       ("iq3xxs", "IQ3_XXS"), ("iq3s", "IQ3_S"), ("iq1s", "IQ1_S")])
def test_grid_tables_match_gguf(table, cls):
    q = getattr(Q, cls)
    q.init_grid()
    theirs = q.grid.reshape(q.grid_shape)
    ours = iquants.tables()[table].numpy()
    assert ours.shape == tuple(q.grid_shape)
    assert _sha(ours) == _sha(theirs)


def test_small_tables_match_gguf():
    assert hashlib.sha256(bytes(iq_tables.KSIGNS_IQ2XS)).hexdigest() == hashlib.sha256(Q.IQ2_XXS.ksigns).hexdigest()
    assert iq_tables.KVALUES_IQ4NL == tuple(Q.IQ4_NL.kvalues)
    assert iq_tables.KVALUES_MXFP4 == tuple(Q.MXFP4.kvalues)
    assert iq_tables.IQ1S_DELTA == float(Q.IQ1_S.delta) == iq_tables.IQ1M_DELTA == float(Q.IQ1_M.delta)
    t = iquants.tables()
    # ksigns as +-1 rows: bit j of ksigns[i] set -> value j negative
    ks = np.array(iq_tables.KSIGNS_IQ2XS, dtype=np.uint8)
    bits = (ks[:, None] >> np.arange(8)) & 1
    assert np.array_equal(t["ksigns"].numpy(), np.where(bits == 1, -1.0, 1.0).astype(np.float32))
    for key, kv in (("iq4nl", Q.IQ4_NL.kvalues), ("mxfp4", Q.MXFP4.kvalues)):
        byte = np.arange(256)
        assert np.array_equal(t[key].numpy(), np.stack([np.array(kv)[byte & 15], np.array(kv)[byte >> 4]], 1))


def test_runtime_does_not_import_gguf():
    import ast
    import inspect

    for mod in (iquants, iq_tables, FM, reference):
        tree = ast.parse(inspect.getsource(mod))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m == "gguf" or m.startswith("gguf.") for m in imported), mod.__name__


# ---------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_bit_exact_with_gguf(name):
    fmt = DEQUANT_ONLY_FORMATS[name]
    bpr = 4 if fmt.block_size == 256 else 16
    data, cols = _data(name, rows=96, blocks_per_row=bpr, seed=fmt.ggml_type)
    ref = _gguf_dequantize(name, data)
    ours = dequantize(name, torch.from_numpy(data), cols)
    assert ours.dtype == torch.float32 and ours.shape == (96, cols)
    assert _same_bits(ours.numpy(), ref)
    if name != "mxfp4":
        assert np.isfinite(ref).all()  # the scales were valid: a real comparison, not NaN == NaN


@pytest.mark.parametrize("name", ["iq2_xxs", "iq1_m", "iq4_nl", "tq1_0", "mxfp4"])
def test_tiles_and_layouts_do_not_change_values(name, monkeypatch):
    fmt = DEQUANT_ONLY_FORMATS[name]
    data, cols = _data(name, rows=24, blocks_per_row=8 if fmt.block_size == 256 else 64, seed=5)
    whole = dequantize(name, torch.from_numpy(data), cols)
    monkeypatch.setattr(FM, "_DEQUANT_TILE", fmt.block_size * 3)  # rows split across tiles, on worker threads
    torch.set_num_threads(2)
    try:
        tiled = dequantize(name, torch.from_numpy(data), cols)
    finally:
        torch.set_num_threads(1)
    assert _same_bits(tiled.numpy(), whole.numpy())
    t = torch.from_numpy(data)
    assert torch.equal(dequantize(name, t.reshape(2, 12, -1), cols), whole.reshape(2, 12, cols))  # leading dims
    wide = torch.zeros(24, 2 * data.shape[1], dtype=torch.uint8)
    wide[:, ::2] = t  # a strided view
    assert _same_bits(dequantize(name, wide[:, ::2], cols).numpy(), whole.numpy())
    assert torch.equal(dequantize(name, t, cols, dtype=torch.bfloat16), whole.to(torch.bfloat16))


def test_row_bytes_and_errors():
    assert row_bytes("iq2_xxs", 512) == 2 * 66
    assert row_bytes("mxfp4", 64) == 2 * 17
    with pytest.raises(ValueError, match=r"iq4_xs.*256"):
        row_bytes("iq4_xs", 32)
    with pytest.raises(ValueError, match="iq3_s"):
        dequantize("iq3_s", torch.zeros(2, 109, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match=r"iq2_xxs is dequantize-only"):
        quantize("iq2_xxs", torch.zeros(2, 256))
    with pytest.raises(ValueError, match="unknown"):
        quantize("iq5_q", torch.zeros(2, 256))


# ---------------------------------------------------------------------------- registration and --isq


def test_registered_as_dequantize_only_quantizers():
    registry = get_registry()
    for name, (bpw, type_id, _block) in DEQUANT_ONLY_TYPES.items():
        spec = registry.quantizers.get(name)
        assert spec is not None and spec.name == name
        assert spec.isq is False and spec.shorthand is None and spec.sensitive is None and spec.fallback is None
        assert spec.bits_per_weight == bpw and spec.ggml_type == type_id
        assert set(spec.devices) == {"cpu", "cuda", "mps"}
        assert registry.quantizer_for_ggml_type(type_id) is spec
        assert registry.quantizer_for_ggml_type(int(_gt(name))) is spec
        assert registry.kernel(f"qmatmul_{name}", "cpu").reference
        method = make_method(spec)
        assert isinstance(method, GgmlLinearMethod) and method.dequantize_only
    for name, type_id in GGML_TYPE_IDS.items():  # the quantizable ones are unchanged
        if name in TYPES:
            assert registry.quantizer_for_ggml_type(type_id).isq


def test_isq_refuses_and_never_lists_them():
    names = isq_type_names()
    assert not set(names) & set(NAMES)
    for text in ("iq2_xxs", "IQ2_XXS", "iq2xxs", "mxfp4", "TQ1_0", "iq4_nl"):
        with pytest.raises(ConfigError, match="--isq") as err:
            resolve_isq_type(text, device_type="cpu")
        message = str(err.value)
        assert "q4k" in message  # it lists the valid choices ...
        assert not any(n in message.split("choose one of", 1)[1] for n in NAMES)  # ... and only ISQ types


def test_topology_pins_refuse_them():
    from mistralrs.topology import parse_topology

    def validate(name: str) -> str | None:  # as serving.py checks a --topology file
        try:
            resolve_isq_type(name, device_type="cpu", source="isq")
        except ConfigError as exc:
            return str(exc)
        return None

    with pytest.raises(ConfigError, match="iq1_m"):
        parse_topology("0-2:\n  isq: iq1_m\n", "isq.yml", validate_isq=validate)


def test_names_are_case_insensitive_and_have_gguf_spelling():
    registry = get_registry()
    from mistralrs.quantization import find_quantizer as _find

    for name in NAMES:
        assert _find(name.upper(), registry).name == name
    assert _find("iq2xxs", registry).name == "iq2_xxs"
    assert _find("Tq2_0", registry).name == "tq2_0"


# ---------------------------------------------------------------------------- the linear method


def _ggml_layer(name: str, out_features: int, raw: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """A Linear built on the meta device and filled from GGUF block bytes, as the GGUF loader does."""
    method = make_method(get_registry().quantizer_for_ggml_type(int(_gt(name))))
    in_features = raw.shape[1] // DEQUANT_ONLY_FORMATS[name].type_size * DEQUANT_ONLY_FORMATS[name].block_size
    with torch.device("meta"):
        layer = Linear(in_features, out_features, bias=bias is not None, quant_method=method)
    assert method.check_shape(out_features, in_features) is None
    try:  # the GGUF loader hands the layer's weight_loader the blocks with their type and shape
        from mistralrs.nn.quantized import GgmlBlocks
    except ImportError:  # before GgmlBlocks: load_ggml takes the bytes themselves
        method.load_ggml(layer, raw)
    else:
        layer.weight.weight_loader(layer.weight, GgmlBlocks(raw, int(_gt(name)), (out_features, in_features)))
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    layer.process_after_loading()  # nothing left: the blocks are the state
    return layer


@pytest.mark.parametrize("name", NAMES)
def test_linear_from_ggml_blocks(name):
    fmt = DEQUANT_ONLY_FORMATS[name]
    data, cols = _data(name, rows=40, blocks_per_row=2 if fmt.block_size == 256 else 8, seed=11)
    if name == "mxfp4":
        data[:, ::fmt.type_size] = np.random.default_rng(3).integers(100, 130, (40, data.shape[1] // 17))  # finite
    raw = torch.from_numpy(data.copy())
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(40, generator=g)
    layer = _ggml_layer(name, 40, raw, bias)
    method = layer.quant_method
    assert "weight" not in layer._parameters and torch.equal(layer.qweight, raw)
    assert method.state_bytes(layer) == 40 * row_bytes(name, cols)
    w = method.dequantize(layer)
    assert _same_bits(w.numpy(), _gguf_dequantize(name, data))
    x = torch.randn(3, 5, cols, generator=g)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    assert torch.equal(reference_matmul(name, x.reshape(-1, cols), raw), F.linear(x.reshape(-1, cols), w))
    xb = x.bfloat16()
    assert layer(xb).dtype == torch.bfloat16
    # dequantize_rows: an embedding lookup of some rows, any index shape
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    rows = method.dequantize_rows(layer, ids)
    assert rows.shape == (2, 3, cols) and torch.equal(rows, w[ids])


def reference_matmul(name: str, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    return getattr(reference, f"qmatmul_{name}")(x, raw, out_f32=True)


def test_quantize_refused_with_the_type_named():
    layer_method = GgmlLinearMethod("IQ3_S")
    assert layer_method.qtype == "iq3_s" and layer_method.dequantize_only
    assert "iq3_s" in layer_method.check_shape(8, 128) and "256" in layer_method.check_shape(8, 128)
    assert GgmlLinearMethod("mxfp4").check_shape(8, 64) is None
    assert "32" in GgmlLinearMethod("iq4_nl").check_shape(8, 48)
    with torch.device("meta"):
        layer = Linear(256, 4, quant_method=layer_method)
    with pytest.raises(ValueError, match=r"iq3_s is dequantize-only"):
        layer.weight.weight_loader(layer.weight, torch.randn(4, 256))
    with pytest.raises(ValueError, match="not a GGML block type"):
        GgmlLinearMethod("iq9_z")


def test_fused_rows_of_a_dequantize_only_type():
    from mistralrs.nn.quantized import fuse_rows

    name = "iq2_s"
    a = torch.from_numpy(_data(name, 8, 1, seed=1)[0])
    b = torch.from_numpy(_data(name, 4, 1, seed=2)[0])
    la, lb = _ggml_layer(name, 8, a), _ggml_layer(name, 4, b)
    fused = fuse_rows([la, lb])
    assert fused is not None
    x = torch.randn(2, 256)
    torch.testing.assert_close(fused(x), torch.cat([la(x), lb(x)], -1))
