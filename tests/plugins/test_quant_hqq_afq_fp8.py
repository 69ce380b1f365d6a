"""The hqq, afq and fp8 quantizer plugins: registration, reconstruction error per bit width,
storage cost, the Linear life cycle, shape checks, and the formats' details (mistral.rs's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn.linear import Linear
from mistralrs.plugins import get_registry
from mistralrs.quantization import IsqPlan, make_method, resolve_isq_type
from mistralrs_plugins.quant.afq import method as afq
from mistralrs_plugins.quant.fp8 import method as fp8
from mistralrs_plugins.quant.hqq import method as hqq

# relative RMSE bounds on a normal(0, 1) [128, 256] matrix (measured on [1024, 2048]: afq2 0.451,
# afq3 0.192, afq4 0.090, afq6 0.021, afq8 0.0054, hqq4 0.086, hqq8 0.0051, fp8 0.026, f8q8 0.0057)
BOUNDS = {
    "afq2": 0.50, "afq3": 0.22, "afq4": 0.10, "afq6": 0.025, "afq8": 0.0065,
    "hqq4": 0.095, "hqq8": 0.006,
    "fp8": 0.030, "f8q8": 0.0065,
}
TYPES = list(BOUNDS)
OUT, IN = 128, 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny ops: OpenMP hand-offs cost more than they save (and the machine is shared)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _spec(name):
    return get_registry().quantizers.get(name)


def _weight(out=OUT, inp=IN, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g).to(dtype)


def _quantized(name, weight, bias=None):
    """A Linear through the core life cycle: built on the meta device (costing nothing), its
    weight's loader quantizes the checkpoint tensor as it streams in, the bias is copied."""
    method = make_method(_spec(name))
    with torch.device("meta"):
        layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, quant_method=method)
    layer.weight.weight_loader(layer.weight, weight)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    layer.process_after_loading()  # nothing left to do: already quantized
    return layer, method


def _rel_rmse(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# ------------------------------------------------------------------------------- registration


def test_every_type_is_registered_as_isq_with_its_fields():
    expected = {
        # name: (bits per weight, shorthand, shorthand devices, sensitive, devices)
        "afq2": (2.5, 2, ("mps",), "afq6", ("cpu", "cuda", "mps")),
        "afq3": (3.5, 3, ("mps",), "afq6", ("cpu", "cuda", "mps")),
        "afq4": (5.0, 4, ("mps",), "afq6", ("cpu", "cuda", "mps")),  # fp32 scale+bias in the kernel layout
        "afq6": (6.5, 6, ("mps",), "afq8", ("cpu", "cuda", "mps")),
        "afq8": (9.0, 8, ("mps",), "afq8", ("cpu", "cuda", "mps")),
        "hqq4": (5.0, None, (), None, ("cpu", "cuda", "mps")),
        "hqq8": (9.0, None, (), None, ("cpu", "cuda", "mps")),
        "fp8": (8.0, None, (), None, ("cpu", "cuda", "mps")),
        "f8q8": (8.25, None, (), None, ("cpu",)),
    }
    for name, (bpw, shorthand, sh_devices, sensitive, devices) in expected.items():
        spec = _spec(name)
        assert spec.isq and spec.fallback is None, name
        assert (spec.bits_per_weight, spec.shorthand, spec.shorthand_devices, spec.sensitive, spec.devices) == (
            bpw, shorthand, sh_devices, sensitive, devices), name
    assert _spec("fp8").aliases == ("f8e4m3",)


def test_names_aliases_and_shorthands_resolve():
    assert resolve_isq_type("F8E4M3").name == "fp8"
    assert resolve_isq_type("HQQ4").name == "hqq4"
    for bits in (2, 3, 4, 6, 8):
        assert resolve_isq_type(str(bits), device_type="mps").name == f"afq{bits}"
        assert not resolve_isq_type(str(bits), device_type="cpu").name.startswith("afq")
    from mistralrs.errors import ConfigError

    with pytest.raises(ConfigError, match="f8q8 cannot run on cuda"):
        resolve_isq_type("f8q8", device_type="cuda")


def test_sensitive_tensor_policy():
    # mistral.rs IsqType::promote_for_sensitive_tensor: afq2/3/4 -> afq6, afq6/8 -> afq8, others kept
    promoted = {"afq2": "afq6", "afq3": "afq6", "afq4": "afq6", "afq6": "afq8", "afq8": "afq8",
                "hqq4": "hqq4", "hqq8": "hqq8", "fp8": "fp8", "f8q8": "f8q8"}
    for name, want in promoted.items():
        plan = IsqPlan(name)
        assert plan.type_for("lm_head").name == want, name
        assert plan.type_for("model.layers.0.mlp.down_proj").name == name


def test_registering_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mistralrs_plugins.quant import afq, awq, bnb, fp8, ggml, gptq, hqq\n"
        "specs = []\n"
        "for plugin in (afq, fp8, hqq, gptq, awq, bnb, ggml):\n"
        "    plugin.register_quantizers(specs.append)\n"
        "names = sorted(s.name for s in specs if not s.isq)\n"
        "assert names == ['awq', 'bnb', 'fp8_checkpoint', 'gptq', 'hqq_checkpoint', 'iq1_m', 'iq1_s', 'iq2_s', 'iq2_xs',"
        " 'iq2_xxs', 'iq3_s', 'iq3_xxs', 'iq4_nl', 'iq4_xs', 'mlx_afq', 'mxfp4', 'mxfp4_checkpoint', 'tq1_0', 'tq2_0'], names\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", TYPES)
def test_reconstruction_error_is_within_the_bit_width_bound(name, dtype):
    w = _weight(dtype=dtype)
    layer, method = _quantized(name, w)
    deq = method.dequantize(layer)
    assert deq.dtype == torch.float32 and deq.shape == (OUT, IN)
    assert torch.isfinite(deq).all()
    assert _rel_rmse(deq, w.float()) < BOUNDS[name]


@pytest.mark.parametrize("name", TYPES)
def test_state_is_compact(name):
    w = _weight(dtype=torch.bfloat16)
    layer, method = _quantized(name, w)
    bits = method.state_bytes(layer) * 8 / w.numel()
    assert bits == pytest.approx(_spec(name).bits_per_weight, rel=0.02)
    assert bits < 16 * 0.6  # well under the bf16 weight it replaces


def test_hqq_optimizer_beats_plain_rounding():
    w = _weight(256, 512)
    for bits in (4, 8):
        plain = hqq.quantize_hqq(w, bits, optimization_steps=0)
        tuned = hqq.quantize_hqq(w, bits)
        errs = []
        for st in (plain, tuned):
            deq = hqq.dequantize_flat(st["qweight"], st["scales"], st["zeros"], bits, 0, w.numel()).reshape(w.shape)
            errs.append(((deq - w).abs().mean().item(), _rel_rmse(deq, w)))
        (mae0, rmse0), (mae1, rmse1) = errs
        assert mae1 < mae0 * 0.99 and rmse1 < rmse0, (bits, errs)


def test_hqq_blocked_optimizer_equals_one_block(monkeypatch):
    w = _weight(64, 256, seed=3)
    whole = hqq.quantize_hqq(w, 4)
    monkeypatch.setattr(hqq, "_CHUNK_ELEMENTS", 64 * 16)  # 16 groups per block
    blocked = hqq.quantize_hqq(w, 4)
    assert torch.equal(whole["qweight"], blocked["qweight"])
    torch.testing.assert_close(whole["zeros"], blocked["zeros"])


def test_hqq_layout_is_mistralrs_axis0_groups():
    # a group is a column of W.reshape(64, -1); hqq4 packs row i with row i + 32 (high, low nibble)
    w = _weight(64, 128, seed=4)
    st = hqq.quantize_hqq(w, 4)
    m = w.numel() // 64
    assert st["qweight"].shape == (32, m) and st["scales"].shape == (1, m) and st["zeros"].shape == (1, m)
    v = w.reshape(64, m)
    scale = 1.0 / st["scales"]
    codes = (v * scale + st["zeros"]).round().clamp(0, 15).to(torch.uint8)
    assert torch.equal(st["qweight"], (codes[:32] << 4) | codes[32:])
    st8 = hqq.quantize_hqq(w, 8)
    assert st8["qweight"].shape == (64, m)


def _mistralrs_afq_words(q: np.ndarray, bits: int) -> np.ndarray:
    """mistral.rs's CPU AFQ packing (afq/ops.rs cpu_backend): a u32 bit stream per row."""
    rows, n = q.shape
    words = np.zeros((rows, n * bits // 32), dtype=np.uint64)
    for r in range(rows):
        for j in range(n):
            off = j * bits
            word, shift = off // 32, off % 32
            words[r, word] |= (int(q[r, j]) << shift) & 0xFFFFFFFF
            if shift + bits > 32:
                words[r, word + 1] |= int(q[r, j]) >> (32 - shift)
    return words.astype(np.uint32)


@pytest.mark.parametrize("bits", afq.BITS)
def test_afq_packing_is_mistralrs_u32_bit_stream(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (3, 128), generator=g)
    packed = afq.pack_codes(q, bits)
    assert packed.shape == (3, 128 * bits // 8)
    assert np.array_equal(packed.numpy().view(np.uint32), _mistralrs_afq_words(q.numpy(), bits))
    assert torch.equal(afq.unpack_codes(packed, bits), q.to(torch.int32))


def test_afq_groups_scales_and_biases():
    w = _weight(8, 128, seed=5, dtype=torch.bfloat16)
    st = afq.quantize_afq(w, 4)
    assert st["scales"].dtype == torch.bfloat16 and st["scales"].shape == (8, 2)
    groups = w.float().reshape(8, 2, 64)
    torch.testing.assert_close(st["biases"].float(), groups.amin(-1).bfloat16().float())
    torch.testing.assert_close(st["scales"].float(), ((groups.amax(-1) - groups.amin(-1)) / 15).bfloat16().float())
    # codes are taken against the stored grid: every weight within half a step (+ the top's rounding)
    deq = afq.dequantize_afq(st["qweight"], st["scales"], st["biases"], 4, 64).reshape(8, 2, 64)
    step = st["scales"].float().unsqueeze(-1)
    assert ((deq - groups).abs() <= step * 0.5 + step * 15 * 2 ** -8).all()
    # a constant group: scale 1, bias = the value, exact
    c = torch.full((2, 64), 0.375)
    stc = afq.quantize_afq(c, 3)
    assert torch.equal(afq.dequantize_afq(stc["qweight"], stc["scales"], stc["biases"], 3, 64), c)


def test_fp8_is_one_scale_per_tensor_as_mistralrs():
    w = _weight(16, 64, seed=6) * 0.05  # absmax < 1: mistral.rs caps the quantize scale at 448
    st = fp8.quantize_fp8(w)
    assert st["qweight"].dtype == torch.uint8 and st["scale"].shape == ()
    qs = min(448.0 / w.abs().max().item(), 448.0)
    assert st["scale"].item() == pytest.approx(1.0 / qs, rel=1e-6)
    expected = (w * qs).to(torch.float8_e4m3fn)
    assert torch.equal(st["qweight"].view(torch.float8_e4m3fn).float(), expected.float())
    w2 = _weight(16, 64, seed=6) * 10
    st2 = fp8.quantize_fp8(w2)
    assert st2["scale"].item() == pytest.approx(w2.abs().max().item() / 448.0, rel=1e-6)
    assert st2["qweight"].view(torch.float8_e4m3fn).float().abs().max().item() == 448.0


def test_f8q8_blocks_are_mistralrs_bytes():
    w = _weight(4, 64, seed=7)
    blocks = fp8.quantize_f8q8(w)["qweight"]
    assert blocks.shape == (8, 33) and blocks.dtype == torch.uint8
    x = w.reshape(8, 32)
    d8 = blocks[:, 0].contiguous().view(torch.float8_e4m3fn).float()
    qs = blocks[:, 1:].contiguous().view(torch.int8).float()
    # BlockF8Q8: d = e4m3(d8) / 448, w = qs * d (mistral.rs dq_d); d8 is amax*448/127 rounded up
    want = x.abs().amax(-1) / 127 * 448
    assert (d8 >= want).all() and (d8 <= want * 1.125 + 1e-6).all()
    d = d8 / 448
    assert qs.abs().max() <= 127
    assert ((qs * d.unsqueeze(-1) - x).abs() <= d.unsqueeze(-1) / 2 + 1e-7).all()
    torch.testing.assert_close(fp8.dequantize_f8q8_blocks(blocks), qs * d.unsqueeze(-1))


def test_f8q8_pads_a_weight_that_is_not_whole_blocks():
    w = _weight(3, 50, seed=8)
    layer, method = _quantized("f8q8", w)
    assert layer.qweight.shape == (5, 33)  # 150 weights -> 5 blocks, the last half padding
    assert _rel_rmse(method.dequantize(layer), w) < BOUNDS["f8q8"]


@pytest.mark.parametrize("name", TYPES)
def test_zero_weight_dequantizes_to_zero(name):
    layer, method = _quantized(name, torch.zeros(64, 128))
    assert torch.equal(method.dequantize(layer), torch.zeros(64, 128))


# ------------------------------------------------------------------------------- life cycle


@pytest.mark.parametrize("name", TYPES)
def test_linear_life_cycle_and_forward(name):
    w = _weight(dtype=torch.bfloat16)
    b = torch.randn(OUT)
    layer, method = _quantized(name, w, bias=b)
    assert "weight" not in dict(layer.named_parameters())
    sd = layer.state_dict()
    assert set(method.state(layer)) <= set(sd) and "bias" in sd and "weight" not in sd
    x = torch.randn(2, 3, IN)
    _assert_forward_close(name, layer(x), x, method.dequantize(layer), b)
    xb = x.bfloat16()
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, OUT)
    y32 = method.apply(layer, xb, out_f32=True)
    assert y32.dtype == torch.float32
    _assert_forward_close(name, y32, xb.float(), method.dequantize(layer), b)


# afq4/afq8 run the native affine kernels, which quantize activations to 8 bits per block of 32 (as llama.cpp
# does): their error against the float product is that of the activations' rounding, not fp32's.
_INT8_ACTIVATIONS = {"afq4", "afq8"}


def _assert_forward_close(name: str, got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    want = F.linear(x.double(), w.double(), b.double())
    if name in _INT8_ACTIVATIONS:
        assert float((got - want).norm() / want.norm()) < 1e-2
    else:  # fp32 sums: each output within 1e-5 of the sum of its |terms| (an elementwise rtol fails on cancellation)
        mag = F.linear(x.double().abs(), w.double().abs(), b.double().abs())
        assert bool(((got.double() - want).abs() <= 1e-5 * mag).all())


@pytest.mark.parametrize("name", ["afq4", "hqq4", "fp8", "f8q8"])
def test_weight_filled_in_place_is_quantized_after_loading(name):
    w = _weight(seed=9)
    layer = Linear(IN, OUT, quant_method=make_method(_spec(name)))
    layer.weight.data.copy_(w)
    layer.process_after_loading()
    method = layer.quant_method
    assert method.is_quantized(layer) and "weight" not in layer._parameters
    assert _rel_rmse(method.dequantize(layer), w) < BOUNDS[name]


@pytest.mark.parametrize("name", TYPES)
def test_blocked_forward_and_row_lookup_match_the_whole_weight(name, monkeypatch):
    layer, method = _quantized(name, _weight(seed=10))
    full = method.dequantize(layer)
    x = torch.randn(5, IN)
    whole = layer(x)
    for mod in (afq, fp8):
        monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", IN * 48)  # 48 rows per block, a ragged last one
    monkeypatch.setattr(hqq, "_MATMUL_CHUNK_ELEMENTS", IN * 48)
    torch.testing.assert_close(layer(x), whole, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([[0, 5], [OUT - 1, 77]])
    torch.testing.assert_close(method.dequantize_rows(layer, rows), full[rows])


# ------------------------------------------------------------------------------ shape checks


class _Shape:
    def __init__(self, out_features, in_features):
        self.out_features, self.in_features = out_features, in_features


def test_check_shape_reports_what_a_type_cannot_take():
    for bits in afq.BITS:
        method = make_method(_spec(f"afq{bits}"))
        assert method.check_shape(128, 256) is None
        assert "in_features divisible by its group size 64" in method.check_shape(128, 100)
    for bits in (4, 8):
        method = make_method(_spec(f"hqq{bits}"))
        assert method.check_shape(3, 64) is None  # out*in % 64 is what HQQ needs
        assert "out*in divisible by its group size 64" in method.check_shape(3, 21)
    for name in ("fp8", "f8q8"):
        assert make_method(_spec(name)).check_shape(3, 21) is None
    with pytest.raises(ValueError, match="group size"):
        make_method(_spec("afq4")).quantize(torch.randn(4, 100))


def test_a_layer_that_cannot_take_afq_stays_unquantized():
    plan = IsqPlan("afq4")
    assert plan.method_for("model.layers.0.mlp.down_proj", _Shape(64, 100)) is None
    assert plan.fallbacks == {("afq4", "unquantized"): ["model.layers.0.mlp.down_proj"]}
    assert isinstance(plan.method_for("model.layers.0.mlp.up_proj", _Shape(64, 128)), afq.AfqLinearMethod)


def test_unknown_type_names_are_refused_by_the_methods():
    with pytest.raises(ValueError):
        afq.AfqLinearMethod("afq5")
    with pytest.raises(ValueError):
        hqq.HqqLinearMethod("hqq3")
    with pytest.raises(ValueError):
        fp8.Fp8LinearMethod("fp4")
