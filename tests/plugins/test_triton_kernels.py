"""The Triton kernel plugins (`kernels/triton_*`) against their torch references, in interpreter mode
(``TRITON_INTERPRET=1``, CPU tensors): fresh random inputs each run, awkward sizes (not multiples of the
blocks, one token, an empty batch), bf16 and fp32. Shapes stay tiny: the interpreter runs each program
in numpy. Longer cases are marked slow. Skipped when triton is not installed (`pip install
'mistralrs[cuda]'`, or `nox -s triton`)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.nn import torch_ops
from tests.helpers.triton_interp import interpreted, randn, seeded, triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")

# bf16: one ulp (the interpreter's fp32 -> bf16 cast truncates where a GPU rounds to nearest).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request) -> torch.Generator:
    return seeded(request)


@pytest.fixture(scope="module")
def norm():
    return interpreted("mistralrs_plugins.kernels.triton_norm.kernels")


@pytest.fixture(scope="module")
def rope():
    return interpreted("mistralrs_plugins.kernels.triton_rotary.kernels")


@pytest.fixture(scope="module")
def act():
    return interpreted("mistralrs_plugins.kernels.triton_activation.kernels")


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[want.dtype])


def qclose(got: torch.Tensor, want: torch.Tensor) -> None:
    """Matmuls over dequantized weights of magnitude ~10: fp32 sums in another order (or one bf16 ulp)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = dict(atol=2e-4, rtol=1e-4) if want.dtype == torch.float32 else TOL[want.dtype]
    torch.testing.assert_close(got, want, **tol)


# -- rms_norm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (5, 33), (2, 3, 100), (0, 16)])
@pytest.mark.parametrize("unit", [False, True])
def test_rms_norm(norm, gen, dtype, shape, unit):
    x = randn(gen, *shape, dtype=dtype)
    w = randn(gen, shape[-1], dtype=dtype, scale=0.5)
    close(norm.rms_norm(x, w, 1e-6, unit), torch_ops.rms_norm(x, w, 1e-6, unit))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 24), (7, 65), (0, 8)])
def test_fused_add_rms_norm(norm, gen, dtype, shape):
    x, r = randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype)
    w = randn(gen, shape[-1], dtype=dtype)
    y, h = norm.fused_add_rms_norm(x, r, w, 1e-5)
    y_ref, h_ref = torch_ops.fused_add_rms_norm(x, r, w, 1e-5)
    close(h, h_ref)  # in fp32 exactly the reference's sum (the interpreter truncates bf16 casts: 1 ulp)
    if dtype == torch.float32:
        assert torch.equal(h, h_ref)
    close(y, y_ref)


def test_rms_norm_strided_rows(norm, gen):
    x = randn(gen, 4, 40)[:, :20]  # rows with a stride: a view of a wider tensor
    w = randn(gen, 20)
    close(norm.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))


def test_rms_norm_outside_the_interpreter_is_the_reference(norm, gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, w = randn(gen, 2, 8), randn(gen, 8)
    assert torch.equal(norm.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))


# -- rotary -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,H,D,R", [(1, 1, 8, None), (3, 5, 24, None), (4, 2, 20, 12), (0, 4, 16, None),
                                     (2, 17, 6, 4)])
def test_rotary(rope, gen, dtype, interleaved, T, H, D, R):
    x = randn(gen, T, H, D, dtype=dtype)
    ang = randn(gen, T, (R or D) // 2, scale=3.0)
    cos, sin = ang.cos(), ang.sin()
    close(rope.rotary(x, cos, sin, R, interleaved), torch_ops.rotary(x, cos, sin, R, interleaved))


def test_rotary_on_a_slice_of_qkv(rope, gen):
    qkv = randn(gen, 3, 6 * 8, dtype=torch.bfloat16)
    q = qkv[:, : 4 * 8].view(3, 4, 8)  # token stride 48, head stride 8: a view, not a copy
    ang = randn(gen, 3, 4)
    close(rope.rotary(q, ang.cos(), ang.sin()), torch_ops.rotary(q, ang.cos(), ang.sin()))


# -- gated activations --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2), (3, 70), (2, 2, 36), (0, 8)])
def test_silu_and_mul(act, gen, dtype, shape):
    x = randn(gen, *shape, dtype=dtype, scale=2.0)
    close(act.silu_and_mul(x), torch_ops.silu_and_mul(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 6), (4, 130)])
def test_gelu_and_mul(act, gen, dtype, approximate, shape):
    x = randn(gen, *shape, dtype=dtype, scale=2.0)
    close(act.gelu_and_mul(x, approximate), torch_ops.gelu_and_mul(x, approximate))


def test_silu_and_mul_over_more_than_one_block(act, gen, monkeypatch):
    monkeypatch.setattr(act, "BLOCK", 16)
    x = randn(gen, 2, 2 * 37)
    close(act.silu_and_mul(x), torch_ops.silu_and_mul(x))


# -- paged_attention_decode ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attn():
    return interpreted("mistralrs_plugins.kernels.triton_attention.kernels")


def paged_case(gen, lens, hq, hk, d, dv=None, block_size=4, dtype=torch.float32):
    """A cache whose blocks are handed out in a random order, and q for each sequence."""
    dv = dv or d
    width = max([-(-n // block_size) for n in lens] + [1])
    n_blocks = width * len(lens) + 3
    order = torch.randperm(n_blocks, generator=gen)
    tables = order[: width * len(lens)].view(len(lens), width).to(torch.int32)
    k = randn(gen, n_blocks * block_size, hk, d, dtype=dtype)
    v = randn(gen, n_blocks * block_size, hk, dv, dtype=dtype)
    q = randn(gen, len(lens), hq, d, dtype=dtype)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,hq,hk,d,dv,bs", [
    ([1], 1, 1, 16, None, 4),            # one token, one head
    ([5, 13, 1], 4, 2, 24, None, 4),     # GQA 2, head dim not a power of two
    ([40, 7], 6, 1, 16, 8, 16),          # MQA, Dv != D, sequences over one BLOCK_N
    ([3, 9], 3, 3, 8, None, 2),          # MHA, tiny heads
])
def test_paged_attention_decode(attn, gen, dtype, lens, hq, hk, d, dv, bs):
    q, k, v, tables, seq_lens = paged_case(gen, lens, hq, hk, d, dv, bs, dtype)
    scale = d ** -0.5
    want = torch_ops.paged_attention_decode(q, k, v, tables, seq_lens, bs, scale)
    close(attn.paged_attention_decode(q, k, v, tables, seq_lens, bs, scale), want)


@pytest.mark.parametrize("window,softcap", [(4, None), (None, 5.0), (6, 2.0), (100, None)])
def test_paged_attention_decode_window_and_softcap(attn, gen, window, softcap):
    q, k, v, tables, seq_lens = paged_case(gen, [11, 3, 20], 4, 2, 16)
    want = torch_ops.paged_attention_decode(q, k, v, tables, seq_lens, 4, 0.3, window, softcap)
    close(attn.paged_attention_decode(q, k, v, tables, seq_lens, 4, 0.3, window, softcap), want)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_paged_attention_decode_split_k(attn, gen, splits):
    # Splits of one BLOCK_N each (some empty: the short sequence and the window leave them no keys).
    q, k, v, tables, seq_lens = paged_case(gen, [70, 5], 2, 1, 16, block_size=8)
    for window in (None, 33):
        want = torch_ops.paged_attention_decode(q, k, v, tables, seq_lens, 8, 0.25, window)
        close(attn.paged_attention_decode(q, k, v, tables, seq_lens, 8, 0.25, window, splits=splits), want)


def test_paged_attention_decode_empty_batch(attn):
    q = torch.empty(0, 4, 16)
    k = v = torch.randn(8, 2, 16)
    out = attn.paged_attention_decode(q, k, v, torch.empty(0, 2, dtype=torch.int32),
                                      torch.empty(0, dtype=torch.int32), 4, 0.25)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("splits,window,softcap,sinks", [(1, None, None, True), (3, None, 3.0, True),
                                                         (2, 9, None, False)])
def test_paged_attention_decode_sinks(attn, gen, splits, window, softcap, sinks):
    # GPT-OSS's sinks join the denominator where the splits are combined (some splits empty: 70 and 5 keys).
    q, k, v, tables, seq_lens = paged_case(gen, [70, 5], 4, 2, 16, block_size=8)
    s = randn(gen, 4, scale=3.0) if sinks else None
    want = torch_ops.paged_attention_decode(q, k, v, tables, seq_lens, 8, 0.25, window, softcap, s)
    close(attn.paged_attention_decode(q, k, v, tables, seq_lens, 8, 0.25, window, softcap, s, splits=splits), want)


def fp8_cache(k: torch.Tensor) -> torch.Tensor:
    """An fp8 KV cache as the engine writes it (`write_slots`: a plain cast, saturating), with the full range."""
    return (k.float() * 40).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits,sinks", [(1, False), (3, True)])
def test_paged_attention_decode_fp8_cache(attn, gen, dtype, splits, sinks):
    q, k, v, tables, seq_lens = paged_case(gen, [37, 4, 1], 4, 2, 24, block_size=4, dtype=dtype)
    k8, v8 = fp8_cache(k), fp8_cache(v)
    s = randn(gen, 4) if sinks else None
    # the fp32 reference rounded once (the reference's bf16 SDPA rounds on the way, off by more than an ulp
    # at these magnitudes; the kernel, like it with softcap or sinks, works in fp32)
    want = torch_ops.paged_attention_decode(q.float(), k8, v8, tables, seq_lens, 4, 0.01, None, None, s).to(dtype)
    got = attn.paged_attention_decode(q, k8, v8, tables, seq_lens, 4, 0.01, None, None, s, splits=splits)
    if dtype is torch.float32:
        # fp32 error is relative to the values averaged (every output is a weighted mean of rows of v, up to
        # ~100 here), not to an output that cancels to near zero (seed 951167153 gave 7.6e-5 relative there)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5 * float(v8.float().abs().max()), rtol=1e-5)
    else:
        close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_decode_long_context_default_splits(attn, gen, dtype):
    # 1100 and 530 positions: the default split count (3 for a 1104-position table) over a long context.
    q, k, v, tables, seq_lens = paged_case(gen, [1100, 530], 8, 2, 64, block_size=16, dtype=dtype)
    assert attn.num_splits(tables.shape[1] * 16) == 3
    for window, softcap in ((None, None), (256, 30.0)):
        want = torch_ops.paged_attention_decode(q, k, v, tables, seq_lens, 16, 0.125, window, softcap)
        close(attn.paged_attention_decode(q, k, v, tables, seq_lens, 16, 0.125, window, softcap), want)


# -- qmatmul (GGML blocks) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant():
    return interpreted("mistralrs_plugins.kernels.triton_quant.kernels")


def quantized(gen, qtype, n, k):
    from mistralrs_plugins.quant.ggml.formats import quantize

    return quantize(qtype, randn(gen, n, k, scale=0.5))


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k"])
@pytest.mark.parametrize("m,n,k", [(1, 5, None), (3, 40, None), (0, 8, None), (17, 3, "2x")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul(quant, gen, qtype, m, n, k, dtype):
    from mistralrs.nn.kernels import lookup_reference

    elems = quant.FORMATS[qtype][1]
    k = 3 * elems if k is None else 2 * elems + (96 if elems == 32 else 0)  # K past one BLOCK_K, not a multiple
    w = quantized(gen, qtype, n, k)
    x = randn(gen, m, k, dtype=dtype)
    ref = lookup_reference(f"qmatmul_{qtype}")
    op = getattr(quant, f"qmatmul_{qtype}")
    got, want = op(x, w, None), ref(x, w, None)
    if dtype is torch.float32:  # sums of K products in another order: O(K * eps) of terms up to ~1 (as y32 below)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    else:
        close(got, want)
    y32 = op(x, w, None, out_f32=True)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, ref(x, w, None, out_f32=True), atol=2e-4, rtol=1e-4)


def test_qmatmul_bias_and_leading_dims(quant, gen):
    from mistralrs.nn.kernels import lookup_reference

    w = quantized(gen, "q4_0", 33, 64)
    x, bias = randn(gen, 2, 3, 64), randn(gen, 33)
    close(quant.qmatmul_q4_0(x, w, bias), lookup_reference("qmatmul_q4_0")(x, w, bias))


def test_qmatmul_shapes_it_does_not_take_go_to_the_reference(quant, gen):
    from mistralrs.nn.kernels import lookup_reference

    w = quantized(gen, "q8_0", 4, 64)
    x = randn(gen, 2, 64, dtype=torch.float64)  # a dtype the kernel does not take
    assert torch.equal(quant.qmatmul_q8_0(x, w, None), lookup_reference("qmatmul_q8_0")(x, w, None))


def test_qmatmul_batch_invariant(quant, gen):
    w = quantized(gen, "q6k", 37, 256)
    x = randn(gen, 21, 256, dtype=torch.bfloat16)
    whole = quant.qmatmul_q6k(x, w, None)
    for i in (0, 17, 20):
        assert torch.equal(quant.qmatmul_q6k(x[i:i + 1], w, None)[0], whole[i])


# -- qmatmul_affine (AWQ / GPTQ / AFQ groups) ---------------------------------------------------------
@pytest.fixture(scope="module")
def affine():
    return interpreted("mistralrs_plugins.kernels.triton_affine.kernels")


def affine_case(gen, n, k, bits, group):
    from mistralrs_plugins.quant.affine import layout

    groups = -(-k // (k if group <= 0 else min(group, k)))
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = randn(gen, n, groups, scale=0.05)
    offsets = randn(gen, n, groups, scale=0.3)
    return layout.pack(codes, scales, offsets, bits, group)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,group,pairs", [(256, 128, 1), (128, 64, 2), (160, 32, 4), (224, -1, 1), (512, 256, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_affine(affine, gen, bits, k, group, pairs, dtype):
    from mistralrs_plugins.quant.affine import layout

    packed, got_pairs = affine_case(gen, 37, k, bits, group)
    assert got_pairs == pairs
    x, bias = randn(gen, 2, 9, k, dtype=dtype), randn(gen, 37, dtype=dtype)
    for b in (None, bias):
        qclose(affine.qmatmul_affine(x, packed, b, bits=bits, pairs=pairs),
              layout.qmatmul_affine(x, packed, b, bits=bits, pairs=pairs))
    y32 = affine.qmatmul_affine(x, packed, bias, bits=bits, pairs=pairs, out_f32=True)
    torch.testing.assert_close(y32, layout.qmatmul_affine(x, packed, bias, bits=bits, pairs=pairs, out_f32=True),
                               atol=2e-4, rtol=1e-4)


def test_qmatmul_affine_one_token_empty_batch_and_batch_invariance(affine, gen):
    packed, pairs = affine_case(gen, 40, 192, 4, 64)
    x = randn(gen, 19, 192, dtype=torch.bfloat16)
    whole = affine.qmatmul_affine(x, packed, bits=4, pairs=pairs)
    for i in (0, 16, 18):
        assert torch.equal(affine.qmatmul_affine(x[i:i + 1], packed, bits=4, pairs=pairs)[0], whole[i])
    assert affine.qmatmul_affine(x[:0], packed, bits=4, pairs=pairs).shape == (0, 40)


def test_qmatmul_affine_what_it_does_not_take_is_the_reference(affine, gen):
    from mistralrs_plugins.quant.affine import layout

    packed, pairs = affine_case(gen, 4, 128, 8, 32)
    x = randn(gen, 3, 128, dtype=torch.float64)
    assert torch.equal(affine.qmatmul_affine(x, packed, bits=8, pairs=pairs),
                       layout.qmatmul_affine(x, packed, bits=8, pairs=pairs))


# -- linear_fp8 / linear_int8 / linear_lut4 (block scales) --------------------------------------------
@pytest.fixture(scope="module")
def widen():
    return interpreted("mistralrs_plugins.kernels.triton_widen.kernels")


def widen_reference(op):
    from mistralrs.nn.kernels import lookup_reference

    return lookup_reference(op)


def test_e4m3_decoding_every_byte(widen):
    # x = I: each output is one weight times 1.0 plus zeros, so the decoded values come out exactly.
    bits = torch.arange(256, dtype=torch.uint8).view(2, 128).clone()
    bits[bits == 0x7F] = 0
    bits[bits == 0xFF] = 0x80
    got = widen.linear_fp8(torch.eye(128), bits, torch.tensor(1.0), None)
    assert torch.equal(got.T, bits.view(torch.float8_e4m3fn).float())
    bits[1, 5] = 0xFF  # NaN, as the reference (and torch's float8) has it
    assert torch.isnan(widen.linear_fp8(torch.eye(128), bits, torch.tensor(1.0), None)[:, 1]).all()


def fp8_weight(gen, n, k):
    return (randn(gen, n, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.mark.parametrize("n,k,block", [(37, 96, (16, 32)), (20, 80, (128, 128)), (33, 160, (8, 48)), (5, 64, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fp8_block_scales(widen, gen, n, k, block, dtype):
    w = fp8_weight(gen, n, k)
    shape = () if block is None else (-(-n // block[0]), -(-k // block[1]))
    scale = randn(gen, *(shape or (1,)), scale=0.01).abs().reshape(shape) + 1e-3
    x, bias = randn(gen, 3, 7, k, dtype=dtype), randn(gen, n, dtype=dtype)
    ref = widen_reference("linear_fp8")
    for b in (None, bias):
        qclose(widen.linear_fp8(x, w, scale, b, block=block), ref(x, w, scale, b, block=block))
    torch.testing.assert_close(widen.linear_fp8(x, w, scale, bias, block=block, out_f32=True),
                               ref(x, w, scale, bias, block=block, out_f32=True), atol=2e-4, rtol=1e-4)
    # a float8 tensor (an FP8 checkpoint's weight) is the same bytes
    qclose(widen.linear_fp8(x, w.view(torch.float8_e4m3fn), scale, None, block=block),
          ref(x, w, scale, None, block=block))


def test_linear_fp8_batch_invariant_and_edges(widen, gen):
    w = fp8_weight(gen, 40, 128)
    scale = randn(gen, 1, 1).abs() + 0.01
    x = randn(gen, 21, 128, dtype=torch.bfloat16)
    whole = widen.linear_fp8(x, w, scale, block=(128, 128))
    for i in (0, 16, 20):
        assert torch.equal(widen.linear_fp8(x[i:i + 1], w, scale, block=(128, 128))[0], whole[i])
    assert widen.linear_fp8(x[:0], w, scale, block=(128, 128)).shape == (0, 40)
    x64 = randn(gen, 2, 128, dtype=torch.float64)  # a dtype the kernel does not take: the reference
    assert torch.equal(widen.linear_fp8(x64, w, scale, block=(128, 128)),
                       widen_reference("linear_fp8")(x64, w, scale, block=(128, 128)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, (1, 80), (3, 16)])
def test_linear_int8(widen, gen, dtype, block):
    n, k = 19, 80
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    shape = () if block is None else (-(-n // block[0]), -(-k // block[1]))
    scale = randn(gen, *(shape or (1,)), scale=0.01).abs().reshape(shape) + 1e-3
    x, bias = randn(gen, 5, k, dtype=dtype), randn(gen, n)
    qclose(widen.linear_int8(x, w, scale, bias, block=block),
          widen_reference("linear_int8")(x, w, scale, bias, block=block))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,block", [(24, 128, (1, 64)), (9, 96, (1, 32)), (7, 64, None)])
def test_linear_lut4(widen, gen, dtype, n, k, block):
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    table = randn(gen, 16)
    shape = () if block is None else (-(-n // block[0]), -(-k // block[1]))
    scale = randn(gen, *(shape or (1,))).abs().reshape(shape) + 0.1
    x, bias = randn(gen, 2, 3, k, dtype=dtype), randn(gen, n, dtype=dtype)
    for b in (None, bias):
        qclose(widen.linear_lut4(x, packed, table, scale, b, block=block),
              widen_reference("linear_lut4")(x, packed, table, scale, b, block=block))


# -- paged_attention_prefill --------------------------------------------------------------------------
def prefill_case(gen, seqs, hq, hk, d, dv=None, block_size=4, dtype=torch.float32):
    """seqs: (cached context, new tokens) per sequence; the new tokens' K/V are in the cache already."""
    lens = [c + n for c, n in seqs]
    _, k, v, tables, _ = paged_case(gen, lens, hq, hk, d, dv, block_size, dtype)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    q = randn(gen, starts[-1], hq, d, dtype=dtype)
    return q, k, v, tables, lens, starts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqs,hq,hk,d,dv,bs", [
    ([(0, 1)], 1, 1, 16, None, 4),                 # one token, no context
    ([(0, 37), (5, 3), (0, 2)], 4, 2, 24, None, 4),  # a prompt past one tile, a chunk over context, GQA
    ([(40, 33), (7, 1)], 6, 1, 16, 8, 16),        # MQA, Dv != D, a chunk over 40 cached positions
    ([(3, 9)], 3, 3, 8, None, 2),                  # MHA, tiny heads
])
def test_paged_attention_prefill(attn, gen, dtype, seqs, hq, hk, d, dv, bs):
    q, k, v, tables, lens, starts = prefill_case(gen, seqs, hq, hk, d, dv, bs, dtype)
    want = torch_ops.paged_attention_prefill(q, k, v, tables, lens, starts, bs, d ** -0.5)
    close(attn.paged_attention_prefill(q, k, v, tables, lens, starts, bs, d ** -0.5), want)


@pytest.mark.parametrize("window,softcap,sinks", [(4, None, False), (None, 5.0, False), (6, 2.0, True),
                                                  (100, None, True), (1, None, False)])
def test_paged_attention_prefill_window_softcap_sinks(attn, gen, window, softcap, sinks):
    q, k, v, tables, lens, starts = prefill_case(gen, [(11, 35), (0, 3), (20, 2)], 4, 2, 16)
    s = randn(gen, 4) if sinks else None
    want = torch_ops.paged_attention_prefill(q, k, v, tables, lens, starts, 4, 0.3, window, softcap, s)
    close(attn.paged_attention_prefill(q, k, v, tables, lens, starts, 4, 0.3, window, softcap, s), want)


def test_paged_attention_prefill_last_row_is_decode(attn, gen):
    # A chunk's last token sees what a decode token at that position sees.
    q, k, v, tables, lens, starts = prefill_case(gen, [(9, 6), (0, 40)], 4, 2, 16, block_size=8)
    got = attn.paged_attention_prefill(q, k, v, tables, lens, starts, 8, 0.25, 16)
    last = torch.tensor([starts[1] - 1, starts[2] - 1])
    dec = torch_ops.paged_attention_decode(q[last], k, v, tables, torch.tensor(lens), 8, 0.25, 16)
    close(got[last], dec)


def test_paged_attention_prefill_empty(attn, gen):
    q, k, v, tables, lens, starts = prefill_case(gen, [(4, 0), (2, 3)], 2, 1, 16)
    want = torch_ops.paged_attention_prefill(q, k, v, tables, lens, starts, 4, 0.25)
    close(attn.paged_attention_prefill(q, k, v, tables, lens, starts, 4, 0.25), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_prefill_fp8_cache(attn, gen, dtype):
    q, k, v, tables, lens, starts = prefill_case(gen, [(6, 35), (0, 3), (2, 0)], 4, 2, 16, dtype=dtype)
    k8, v8, s = fp8_cache(k), fp8_cache(v), randn(gen, 4)
    for window, sinks in ((None, None), (5, s)):
        want = torch_ops.paged_attention_prefill(q, k8, v8, tables, lens, starts, 4, 0.01, window, None, sinks)
        got = attn.paged_attention_prefill(q, k8, v8, tables, lens, starts, 4, 0.01, window, None, sinks)
        if dtype is torch.float32:  # as the decode test: fp32 error relative to the rows of v averaged (~100)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=1e-5 * float(v8.float().abs().max()), rtol=1e-5)
        else:
            close(got, want)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_paged_backend_with_the_triton_kernels(attn, cache_dtype):
    """The paged backend with the Triton decode, prefill and KV-write kernels (what it selects on cuda)
    matches the reference backend over a prefill-only and a mixed step, sinks included; an fp8 cache
    too (written by the Triton fp8 write, read by the kernels)."""
    from mistralrs.attention import KVCacheShape
    from mistralrs_plugins.attention.paged.backend import PagedBackend
    from mistralrs_plugins.attention.sdpa.backend import SdpaBackend
    from tests.plugins.test_attention_sdpa import run_prefill_then_mixed

    shape = KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=32, block_size=4, dtype=cache_dtype)
    for window, softcap, sinks in ((None, None, None), (5, 20.0, torch.tensor([0.5, -1.0, 2.0, 0.0]))):
        paged = PagedBackend(shape)
        paged.decode_kernel, paged.prefill_kernel = attn.paged_attention_decode, attn.paged_attention_prefill
        paged.write = attn.kv_cache_write
        want, _ = run_prefill_then_mixed(SdpaBackend(shape), window=window, softcap=softcap, sinks=sinks)
        got, _ = run_prefill_then_mixed(paged, window=window, softcap=softcap, sinks=sinks)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# -- kv_cache_write (fp8) -----------------------------------------------------------------------------
def written(attn, x: torch.Tensor, slots: torch.Tensor | None = None, n_slots: int | None = None) -> torch.Tensor:
    slots = torch.arange(x.shape[0]) if slots is None else slots
    cache = torch.zeros(n_slots or x.shape[0], *x.shape[1:], dtype=torch.float8_e4m3fn)
    attn.kv_cache_write(cache, slots, x)
    return cache.view(torch.uint8)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs in numpy
def test_kv_cache_write_fp8_every_bf16_value(attn):
    # All 65536 bf16 bit patterns (NaNs, infinities, subnormals, out of range): torch's cast, byte for byte.
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(128, 4, 128)
    assert torch.equal(written(attn, x), x.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN inputs in numpy
def test_kv_cache_write_fp8_rounding_of_fp32(attn, gen):
    # fp32 values at every scale of the format (the 20 dropped bits round to nearest even), ties, the edges.
    edges = [448.0, 463.99, 464.0, 464.01, 479.99, 480.0, 1e30, float("inf"), float("nan"), 2.0 ** -6,
             2.0 ** -6 * (1 - 2 ** -20), 2.0 ** -10, 3 * 2.0 ** -10, 5 * 2.0 ** -11, 2.0 ** -9 * 1.5, 1e-30, 0.0,
             1.0625, 1.1875, 17.0, 18.0, 19.0]
    x = torch.tensor(edges + [-e for e in edges])
    x = torch.cat([x, randn(gen, 4096 - x.numel()) * torch.pow(2.0, torch.randint(-14, 10, (4096 - x.numel(),),
                                                                                       generator=gen).float())])
    x = x.view(64, 2, 32)
    assert torch.equal(written(attn, x), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_kv_cache_write_fp8_into_slots(attn, gen):
    # Scattered slots, a strided x (k of a fused qkv), heads not a power of two; an empty step writes nothing.
    qkv = randn(gen, 5, 3 * 6 * 24, dtype=torch.bfloat16, scale=50.0)
    k = qkv[:, 6 * 24: 2 * 6 * 24].view(5, 6, 24)[:, :5]
    slots = torch.tensor([7, 0, 12, 3, 9])
    cache = written(attn, k, slots, 16)
    want = torch.zeros(16, 5, 24, dtype=torch.float8_e4m3fn)
    torch_ops.kv_cache_write(want, slots, k)
    assert torch.equal(cache, want.view(torch.uint8))
    assert not written(attn, torch.empty(0, 5, 24), torch.empty(0, dtype=torch.long), 4).any()


def test_kv_cache_write_other_caches_are_the_reference(attn, gen):
    x = randn(gen, 3, 2, 8)
    cache = torch.zeros(6, 2, 8, dtype=torch.bfloat16)
    attn.kv_cache_write(cache, torch.tensor([5, 1, 2]), x)
    assert torch.equal(cache[[5, 1, 2]], x.to(torch.bfloat16))


# -- moe_experts --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe():
    return interpreted("mistralrs_plugins.kernels.triton_moe.kernels")


def moe_case(gen, t, h, inter, e, k, dtype=torch.float32, weights_dtype=torch.float32):
    x = randn(gen, t, h, dtype=dtype)
    logits = randn(gen, t, e)
    w, ids = torch.topk(logits.softmax(-1), k, dim=-1)
    w13 = randn(gen, e, 2 * inter, h, dtype=dtype, scale=h ** -0.5)
    w2 = randn(gen, e, h, inter, dtype=dtype, scale=inter ** -0.5)
    return x, (w / w.sum(-1, keepdim=True)).to(weights_dtype), ids, w13, w2


def test_moe_align(moe, gen):
    ids = torch.randint(0, 5, (13, 2), generator=gen)
    pairs, expert = moe.align(ids, 5, block_m=4)
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(expert.tolist()):
        block = [p for p in pairs[b * 4:(b + 1) * 4].tolist() if p < flat.numel()]
        if e < 0:
            assert not block
            continue
        assert all(flat[p] == e for p in block)
        seen += block
    assert sorted(seen) == list(range(flat.numel()))  # every pair once
    assert seen == sorted(seen, key=lambda p: (flat[p].item(), p))  # by expert, stable


@pytest.mark.parametrize("dtype,weights_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("t,h,inter,e,k", [(1, 16, 8, 4, 2), (19, 48, 40, 6, 2), (7, 32, 24, 8, 3), (5, 16, 16, 3, 1)])
def test_moe_experts(moe, gen, dtype, weights_dtype, t, h, inter, e, k):
    x, w, ids, w13, w2 = moe_case(gen, t, h, inter, e, k, dtype, weights_dtype)
    got, want = moe.moe_experts(x, w, ids, w13, w2), torch_ops.moe_experts(x, w, ids, w13, w2)
    if dtype == torch.float32:
        close(got, want)
    else:  # two matmuls rounded to bf16 in a row, truncated by the interpreter: a few ulps of the output's scale
        torch.testing.assert_close(got, want, atol=4e-2 * float(want.abs().max()), rtol=2e-2)


def test_moe_experts_empty_batch_and_unused_experts(moe, gen):
    x, w, ids, w13, w2 = moe_case(gen, 9, 16, 8, 7, 2)
    ids = ids % 2 + 3  # experts 3 and 4 only
    close(moe.moe_experts(x, w, ids, w13, w2), torch_ops.moe_experts(x, w, ids, w13, w2))
    assert moe.moe_experts(x[:0], w[:0], ids[:0], w13, w2).shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_moe_with_the_triton_kernel(moe, monkeypatch, dtype):
    """SparseMoE restacked for the Triton kernel (what it does on cuda) against its loop over experts."""
    from tests.unit.test_nn import stacked_moe

    fused, loop = stacked_moe(moe.moe_experts, monkeypatch, dtype)
    assert fused._stacked is not None
    x = torch.randn(13, 16).to(dtype)
    want = loop(x)
    if dtype == torch.float32:
        close(fused(x), want)
    else:
        torch.testing.assert_close(fused(x), want, atol=4e-2 * float(want.abs().max()), rtol=2e-2)


# -- moe_experts_ggml (GGML-block experts) ------------------------------------------------------------
def ggml_moe_reference():
    from mistralrs.nn.kernels import lookup_reference

    return lookup_reference("moe_experts_ggml")


def ggml_moe_case(gen, qtype, t, h, inter, e, k, dtype=torch.float32):
    from mistralrs_plugins.quant.ggml.formats import quantize

    x, w, ids, w13, w2 = moe_case(gen, t, h, inter, e, k, dtype)
    q13 = torch.stack([quantize(qtype, w13[i].float()) for i in range(e)])
    q2 = torch.stack([quantize(qtype, w2[i].float()) for i in range(e)])
    return x, w, ids, q13, q2


@pytest.mark.parametrize("qtype,t,h,inter,e,k,dtype", [
    ("q4_0", 7, 64, 96, 4, 2, torch.float32), ("q4_0", 7, 64, 96, 4, 2, torch.bfloat16),
    ("q8_0", 1, 32, 32, 3, 1, torch.float32), ("q8_0", 5, 32, 64, 3, 2, torch.bfloat16),
    ("q4k", 2, 256, 256, 2, 1, torch.float32),  # a k-quant's smallest case (the interpreter takes ~5 s)
])
def test_moe_experts_ggml(moe, gen, qtype, t, h, inter, e, k, dtype):
    x, w, ids, q13, q2 = ggml_moe_case(gen, qtype, t, h, inter, e, k, dtype)
    got, want = moe.moe_experts_ggml(x, w, ids, q13, q2, qtype), ggml_moe_reference()(x, w, ids, q13, q2, qtype)
    if dtype == torch.float32:
        qclose(got, want)
    else:
        torch.testing.assert_close(got, want, atol=4e-2 * float(want.abs().max()), rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q2k", "q3k", "q4k", "q5k", "q6k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_ggml_k_quants(moe, gen, qtype, dtype):
    x, w, ids, q13, q2 = ggml_moe_case(gen, qtype, 5, 256, 256, 4, 2, dtype)
    got, want = moe.moe_experts_ggml(x, w, ids, q13, q2, qtype), ggml_moe_reference()(x, w, ids, q13, q2, qtype)
    if dtype == torch.float32:
        qclose(got, want)
    else:
        torch.testing.assert_close(got, want, atol=4e-2 * float(want.abs().max()), rtol=2e-2)


def test_moe_experts_ggml_edges(moe, gen):
    x, w, ids, q13, q2 = ggml_moe_case(gen, "q4_0", 6, 32, 64, 5, 2)
    ids = ids % 2 + 3  # experts 3 and 4 only
    qclose(moe.moe_experts_ggml(x, w, ids, q13, q2, "q4_0"), ggml_moe_reference()(x, w, ids, q13, q2, "q4_0"))
    assert moe.moe_experts_ggml(x[:0], w[:0], ids[:0], q13, q2, "q4_0").shape == (0, 32)
    # a type the kernels do not have: the reference (which dequantizes it)
    from mistralrs_plugins.quant.ggml.formats import quantize

    q13b = torch.stack([quantize("q5_0", torch.randn(128, 32, generator=gen)) for _ in range(5)])
    q2b = torch.stack([quantize("q5_0", torch.randn(32, 64, generator=gen)) for _ in range(5)])
    assert torch.equal(moe.moe_experts_ggml(x, w, ids, q13b, q2b, "q5_0"),
                       ggml_moe_reference()(x, w, ids, q13b, q2b, "q5_0"))


def test_sparse_moe_with_ggml_experts_and_the_triton_kernel(moe, monkeypatch):
    """SparseMoE whose experts are GGML blocks (a GGUF or --isq model), restacked as bytes for the Triton kernel
    (what it does on cuda), against its loop over the experts' own (reference) quantized matmuls."""
    from mistralrs.nn import kernels
    from mistralrs.nn.moe import MIXTRAL_EXPERT_NAMES, SparseMoE
    from mistralrs.nn.quantized import still_fused
    from mistralrs_plugins.quant.ggml import method as ggml_method
    from tests.unit.test_nn import _fill_

    # the experts' own matmuls: the reference (the CPU's q8-activation kernels would differ by ~1%)
    monkeypatch.setattr(ggml_method, "lookup_kernel", lambda op, device: kernels.lookup_reference(op))
    moes = []
    for claimed in (moe.moe_experts_ggml, None):
        monkeypatch.setattr(kernels, "lookup_accelerated", lambda op, device, registry=None, k=claimed: k)
        m = SparseMoE(64, 32, num_experts=5, top_k=2, expert_names=MIXTRAL_EXPERT_NAMES)
        for mod in m.modules():
            if hasattr(mod, "after_materialize"):
                mod.after_materialize()
        _fill_(m, seed=3)
        for mlp in m.expert_list:
            for name in mlp.names:
                lin = getattr(mlp, name)
                weight = lin.weight.detach().clone()
                lin.set_quant_method(ggml_method.GgmlLinearMethod("q4_0"))
                lin.quant_method.set_state(lin, lin.quant_method.quantize(weight))
        for mod in m.modules():  # the loader's walk: the MoE block, then its experts
            if hasattr(mod, "after_loading"):
                mod.after_loading()
        moes.append(m)
    fused, loop = moes
    assert loop._stacked is None
    w13, w2 = fused._stacked
    assert w13.shape == (5, 64, 2 * 18) and w2.shape == (5, 64, 18)
    expert = fused.expert_list[2]
    assert expert.w1.qweight.data_ptr() == w13[2].data_ptr() and expert.w2.qweight.data_ptr() == w2[2].data_ptr()
    assert still_fused(expert._gate_up_q, [expert.w1, expert.w3])  # its own fused gate/up: views of the stack
    x = torch.randn(11, 64)
    qclose(fused(x), loop(x))
    last = fused.expert_list[4].w2  # a replaced expert (re-quantized) ends the stacking
    last.set_quant_method(ggml_method.GgmlLinearMethod("q8_0"))
    last.quant_method.set_state(last, last.quant_method.quantize(torch.randn(64, 32)))
    fused(x)
    assert fused._stacked is None
