"""GGML blocks interleaved by rows (`quant/ggml/interleave.py`): the layout, and the GGML linear method keeping
a layer in it for a kernel that asks (``interleave`` on its ``qmatmul_<type>``) while everything that leaves
the layer (dequantize, embedding rows, UQFF, fusion) stays llama.cpp's canonical block bytes."""

from __future__ import annotations

import pytest
import torch

from mistralrs.nn.linear import Linear
from mistralrs.nn.quantized import fuse_rows
from mistralrs_plugins.quant.ggml import interleave
from mistralrs_plugins.quant.ggml import method as ggml_method
from mistralrs_plugins.quant.ggml.formats import dequantize, quantize
from mistralrs_plugins.quant.ggml.method import GgmlLinearMethod
from mistralrs_plugins.quant.ggml.reference import qmatmul_q4_0 as reference_q4_0


def _blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return quantize("q4_0", torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def test_layout_round_trips_and_is_group_local():
    q = _blocks(24, 160)
    il = interleave.interleave("q4_0", q)
    assert il.shape == (3, 8 * q.shape[1])
    assert torch.equal(interleave.deinterleave("q4_0", il), q)
    # block 1 of group 0: row 5's scale at 144 + 2 * 5; chunk 2 of block 0: row 3's quant bytes 8..11
    assert torch.equal(il[0, 144 + 10:144 + 12], q[5, 18:20])
    assert torch.equal(il[0, 16 + 64 + 12:16 + 64 + 16], q[3, 2 + 8:2 + 12])
    # group-aligned slices and concatenations are the interleaved form of those rows
    assert torch.equal(interleave.interleave("q4_0", q[8:24]), il[1:])
    rows = torch.tensor([[3, 17], [8, 23]])
    assert torch.equal(interleave.deinterleave_rows("q4_0", il, rows), q[rows.reshape(-1)])
    assert interleave.is_interleaved(il, 24) and not interleave.is_interleaved(q, 24)
    assert not interleave.can_interleave("q4_0", 20) and not interleave.can_interleave("q8_0", 24)


def test_q5k_layout_keeps_the_high_bits_by_quad():
    q = torch.randint(0, 256, (16, 2 * 176), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    il = interleave.interleave("q5k", q)
    assert il.shape == (2, 2 * 1440) and torch.equal(interleave.deinterleave("q5k", il), q)
    blk, grp = q[8 + 6, 176:], il[1, 1440:]  # group 1, row 6, block 1
    assert torch.equal(grp[160 + 32 * 5 + 4 * 6:][:4], blk[16 + 20:16 + 24])  # qh bytes 20..23
    assert torch.equal(grp[416 + 256 * 3 + 32 * 7 + 4 * 6:][:4], blk[48 + 32 * 3 + 28:48 + 32 * 3 + 32])  # chunk 3, quad 7


def test_q4k_layout_round_trips_every_bit_pattern_and_is_group_local():
    """q4_K's layout decodes the packed 6-bit scales and mins; random bytes (every scale bit pattern) come back."""
    q = torch.randint(0, 256, (24, 2 * 144), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    il = interleave.interleave("q4k", q)
    assert il.shape == (3, 2 * 1184) and interleave.row_bytes("q4k", 512) == 2 * 1184
    assert torch.equal(interleave.deinterleave("q4k", il), q)
    blk = q[8 + 5, 144:288]  # group 1, row 5, block 1
    grp = il[1, 1184:]
    assert torch.equal(grp[10:12], blk[0:2]) and torch.equal(grp[16 + 10:16 + 12], blk[2:4])  # d, dmin
    s = blk[4:16].long()
    scale6 = (s[8 + 2] & 15) | ((s[2] >> 6) << 4)  # scale 6 (llama.cpp's get_scale_min_k4)
    min3 = s[7] & 63
    assert grp[32 + 8 * 6 + 5] == scale6 and grp[96 + 16 * 1 + 2 * 5 + 1] == min3
    assert torch.equal(grp[160 + 256 * 2 + 32 * 3 + 4 * 5:][:4], blk[16 + 32 * 2 + 4 * 3:][:4])  # chunk 2, quad 3
    assert torch.equal(interleave.interleave("q4k", q[8:24]), il[1:])
    rows = torch.tensor([[3, 17], [8, 23]])
    assert torch.equal(interleave.deinterleave_rows("q4k", il, rows), q[rows.reshape(-1)])


def _layer(n: int, k: int, monkeypatch, kernel) -> tuple[Linear, torch.Tensor]:
    """A q4_0 layer loaded from a float weight, with `kernel` as the device's qmatmul_q4_0."""
    ops = {"qmatmul_q4_0": kernel, "ggml_interleave": interleave.interleave, "ggml_quantize": _quantizer}
    monkeypatch.setattr(ggml_method, "lookup_kernel", lambda op, device=None: ops[op])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    layer = Linear(k, n, quant_method=GgmlLinearMethod("q4_0"))
    layer.weight.weight_loader(layer.weight, w)
    layer.quant_method.process_after_loading(layer)
    return layer, quantize("q4_0", w)


def _quantizer(qtype: str, w: torch.Tensor) -> torch.Tensor:
    return quantize(qtype, w)


def _asking_kernel(x, qweight, bias=None, *, out_f32=False):
    return reference_q4_0(x, qweight, bias, out_f32=out_f32)


_asking_kernel.interleave = interleave.ROWS  # type: ignore[attr-defined]


def test_a_layer_is_kept_interleaved_for_a_kernel_that_asks(monkeypatch):
    layer, canonical = _layer(24, 96, monkeypatch, _asking_kernel)
    method = layer.quant_method
    assert layer.qweight.shape == (3, 8 * canonical.shape[1])
    assert torch.equal(method.canonical(layer), canonical)
    assert torch.equal(method.dequantize(layer), dequantize("q4_0", canonical, 96))
    rows = torch.tensor([[0, 9], [23, 4]])
    assert torch.equal(method.dequantize_rows(layer, rows), dequantize("q4_0", canonical, 96)[rows])
    assert torch.equal(method.uqff_entries(layer)["weight"], canonical.reshape(-1))
    x = torch.randn(5, 96)
    assert torch.allclose(layer(x), reference_q4_0(x, canonical), atol=1e-5)
    method.process_after_loading(layer)  # idempotent
    assert layer.qweight.shape == (3, 8 * canonical.shape[1])


def test_layers_stay_canonical_where_the_kernel_does_not_ask_or_rows_do_not_group(monkeypatch):
    layer, canonical = _layer(24, 96, monkeypatch, reference_q4_0)
    assert torch.equal(layer.qweight, canonical)
    layer, canonical = _layer(20, 96, monkeypatch, _asking_kernel)  # 20 rows: not whole groups of 8
    assert torch.equal(layer.qweight, canonical)


def test_no_repack_keeps_llama_cpps_block_order(monkeypatch):
    monkeypatch.setenv(ggml_method.NO_REPACK_ENV, "1")
    layer, canonical = _layer(24, 96, monkeypatch, _asking_kernel)
    assert torch.equal(layer.qweight, canonical)
    x = torch.randn(5, 96)
    assert torch.allclose(layer(x), reference_q4_0(x, canonical), atol=1e-5)


def test_interleaved_layers_fuse_into_an_interleaved_layer(monkeypatch):
    a, qa = _layer(16, 64, monkeypatch, _asking_kernel)
    b, qb = _layer(8, 64, monkeypatch, _asking_kernel)
    fused = fuse_rows([a, b])
    assert fused is not None
    assert torch.equal(fused.quant_method.canonical(fused), torch.cat([qa, qb]))
    assert torch.equal(a.quant_method.canonical(a), qa) and torch.equal(b.quant_method.canonical(b), qb)
    assert a.qweight.data_ptr() == fused.qweight.data_ptr()
    x = torch.randn(3, 64)
    assert torch.equal(fused(x), torch.cat([a(x), b(x)], dim=-1))
    c, _ = _layer(12, 64, monkeypatch, _asking_kernel)  # canonical (12 rows): layouts differ, no fusion
    assert fuse_rows([a, c]) is None


@pytest.mark.parametrize("qtype", ["q8_0", "q6k"])
def test_other_types_have_no_interleaved_layout(qtype):
    with pytest.raises(ValueError, match="no interleaved layout"):
        interleave.interleave(qtype, torch.zeros(8, 34, dtype=torch.uint8))
