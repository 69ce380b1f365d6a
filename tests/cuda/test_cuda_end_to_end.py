"""End to end on a CUDA GPU (marker ``cuda``; skipped cleanly without one, as on CPU-only CI).

What runs on a GPU machine (``pytest -m cuda tests/cuda``, with ``mistralrs[cuda]`` for Triton):

- every Triton kernel on CUDA tensors against its torch reference, at model-sized shapes (compiled,
  not interpreted: the same kernels the interpreter tests check on the CPU);
- the registry picks the Triton kernels and the paged attention backend on ``cuda``;
- a tiny random Llama loaded on ``cuda``: greedy tokens through the engine (paged KV cache on the GPU,
  sampling on the GPU) equal transformers' greedy generate on the CPU in fp32, and the all-position
  logits agree (TF32 off);
- the demo model served through `ModelService(device="cuda")` (KV pool sized from free GPU memory).
"""

from __future__ import annotations

import pytest
import torch

from mistralrs import protocol as P
from mistralrs.engine.requests import GenerationRequest
from mistralrs.engine.sampling import SamplingParams
from mistralrs.nn import torch_ops
from mistralrs.plugins import get_registry
from mistralrs.serving import ModelService, ServiceOptions
from tests.helpers.tiny_models import write_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def triton_ops():
    pytest.importorskip("triton")
    from mistralrs_plugins.kernels.triton_support import why_not

    reason = why_not("cuda")
    if reason:
        pytest.skip(f"the Triton kernels do not run here: {reason}")


def test_registry_picks_triton_and_paged_on_cuda():
    triton_ops()
    registry = get_registry()
    for op in ("rms_norm", "rotary", "silu_and_mul", "paged_attention_decode", "qmatmul_q4_0"):
        assert registry.kernel(op, "cuda").name == "triton", op
    assert registry.attention_backends.select(device="cuda", dtype="bfloat16").name == "paged"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_on_cuda(dtype):
    triton_ops()
    from mistralrs_plugins.kernels.triton_activation import kernels as act
    from mistralrs_plugins.kernels.triton_attention import kernels as attn
    from mistralrs_plugins.kernels.triton_norm import kernels as norm
    from mistralrs_plugins.kernels.triton_rotary import kernels as rope

    dev = "cuda"
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    x, r = (torch.randn(37, 4096, device=dev, dtype=dtype) for _ in range(2))
    w = torch.randn(4096, device=dev, dtype=dtype)
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), **tol)
    y, h = norm.fused_add_rms_norm(x, r, w, 1e-6)
    y_ref, h_ref = torch_ops.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(h, h_ref, **tol)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn(37, 2 * 11008, device=dev, dtype=dtype)
    torch.testing.assert_close(act.silu_and_mul(g), torch_ops.silu_and_mul(g), **tol)
    torch.testing.assert_close(act.gelu_and_mul(g), torch_ops.gelu_and_mul(g), **tol)
    q = torch.randn(37, 32, 128, device=dev, dtype=dtype)
    ang = torch.randn(37, 32, device=dev)
    for interleaved in (False, True):
        torch.testing.assert_close(rope.rotary(q, ang.cos(), ang.sin(), 64, interleaved),
                                   torch_ops.rotary(q, ang.cos(), ang.sin(), 64, interleaved), **tol)
    lens = torch.tensor([1, 700, 2049, 33], dtype=torch.int32, device=dev)
    bs, width = 16, 129
    tables = torch.randperm(4 * width, device=dev).view(4, width).to(torch.int32)
    k = torch.randn(4 * width * bs, 8, 128, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    qd = torch.randn(4, 32, 128, device=dev, dtype=dtype)
    for window, softcap in ((None, None), (512, 50.0)):
        torch.testing.assert_close(
            attn.paged_attention_decode(qd, k, v, tables, lens, bs, 128 ** -0.5, window, softcap),
            torch_ops.paged_attention_decode(qd, k, v, tables, lens, bs, 128 ** -0.5, window, softcap), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paged_prefill_on_cuda(dtype):
    """Prefill chunks over cached context (bf16: the tensor-core dots the interpreter cannot run)."""
    triton_ops()
    from mistralrs_plugins.kernels.triton_attention import kernels as attn

    dev = "cuda"
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    bs, width = 16, 80
    tables = torch.randperm(3 * width, device=dev).view(3, width).to(torch.int32)
    k = torch.randn(3 * width * bs, 8, 128, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    lens = [1200, 300, 77]  # new tokens: 200 over 1000 cached, a whole 300-token prompt, 5 over 72
    starts = [0, 200, 500, 505]
    q = torch.randn(505, 32, 128, device=dev, dtype=dtype)
    sinks = torch.randn(32, device=dev)
    for window, softcap, s in ((None, None, None), (256, 50.0, sinks)):
        torch.testing.assert_close(
            attn.paged_attention_prefill(q, k, v, tables, lens, starts, bs, 128 ** -0.5, window, softcap, s),
            torch_ops.paged_attention_prefill(q, k, v, tables, lens, starts, bs, 128 ** -0.5, window, softcap, s),
            **tol)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k"])
def test_triton_qmatmul_on_cuda(qtype):
    triton_ops()
    from mistralrs.nn.kernels import lookup_reference
    from mistralrs_plugins.kernels.triton_quant import kernels as quant
    from mistralrs_plugins.quant.ggml.formats import quantize

    qweight = quantize(qtype, torch.randn(300, 1024) * 0.05).cuda()
    ref = lookup_reference(f"qmatmul_{qtype}")
    for m in (1, 5, 130):
        x = torch.randn(m, 1024, device="cuda")
        torch.testing.assert_close(getattr(quant, f"qmatmul_{qtype}")(x, qweight, None), ref(x, qweight, None),
                                   atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (8, 64)])
def test_triton_qmatmul_affine_on_cuda(bits, group):
    triton_ops()
    from mistralrs_plugins.kernels.triton_affine import kernels as affine
    from mistralrs_plugins.quant.affine import layout

    k = 1024
    codes = torch.randint(0, 1 << bits, (300, k))
    packed, pairs = layout.pack(codes, torch.rand(300, k // group) * 0.01, torch.randn(300, k // group) * 0.1,
                                bits, group)
    packed = packed.cuda()
    for m in (1, 5, 130):
        x = torch.randn(m, k, device="cuda")
        torch.testing.assert_close(affine.qmatmul_affine(x, packed, bits=bits, pairs=pairs),
                                   layout.qmatmul_affine(x, packed, bits=bits, pairs=pairs), atol=1e-3, rtol=1e-3)


def test_triton_linear_fp8_on_cuda():
    triton_ops()
    from mistralrs.nn.kernels import lookup_reference
    from mistralrs_plugins.kernels.triton_widen import kernels as widen

    w = (torch.randn(300, 1024) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).cuda()
    scale = torch.rand(3, 8, device="cuda") * 1e-3
    for m in (1, 5, 130):
        x = torch.randn(m, 1024, device="cuda")
        torch.testing.assert_close(widen.linear_fp8(x, w, scale, None, block=(128, 128)),
                                   lookup_reference("linear_fp8")(x, w, scale, None, block=(128, 128)),
                                   atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_moe_on_cuda(dtype):
    triton_ops()
    from mistralrs_plugins.kernels.triton_moe import kernels as moe

    t, h, inter, e, k = 300, 1024, 768, 16, 2
    x = torch.randn(t, h, device="cuda", dtype=dtype)
    w, ids = torch.topk(torch.randn(t, e, device="cuda").softmax(-1), k, dim=-1)
    w13 = (torch.randn(e, 2 * inter, h, device="cuda") * h ** -0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, device="cuda") * inter ** -0.5).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for m in (1, 7, t):
        torch.testing.assert_close(moe.moe_experts(x[:m], w[:m], ids[:m], w13, w2),
                                   torch_ops.moe_experts(x[:m], w[:m], ids[:m], w13, w2), **tol)


@pytest.mark.parametrize("qtype", ["q4_0", "q4k", "q6k"])
def test_triton_moe_ggml_on_cuda(qtype):
    triton_ops()
    from mistralrs.nn.kernels import lookup_reference
    from mistralrs_plugins.kernels.triton_moe import kernels as moe
    from mistralrs_plugins.quant.ggml.formats import quantize

    t, h, inter, e, k = 200, 1024, 512, 8, 2
    x = torch.randn(t, h, device="cuda")
    w, ids = torch.topk(torch.randn(t, e, device="cuda").softmax(-1), k, dim=-1)
    q13 = torch.stack([quantize(qtype, torch.randn(2 * inter, h) * h ** -0.5) for _ in range(e)]).cuda()
    q2 = torch.stack([quantize(qtype, torch.randn(h, inter) * inter ** -0.5) for _ in range(e)]).cuda()
    for m in (1, 7, t):
        torch.testing.assert_close(moe.moe_experts_ggml(x[:m], w[:m], ids[:m], q13, q2, qtype),
                                   lookup_reference("moe_experts_ggml")(x[:m], w[:m], ids[:m], q13, q2, qtype),
                                   atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fp8_kv_cache_and_sinks_on_cuda(dtype):
    """The fp8 KV-cache write (torch's cast, byte for byte) and decode/prefill over an fp8 cache with sinks."""
    triton_ops()
    from mistralrs_plugins.kernels.triton_attention import kernels as attn

    dev = "cuda"
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(128, 4, 128)
    x = x.to(dev)
    cache = torch.zeros(128, 4, 128, dtype=torch.float8_e4m3fn, device=dev)
    attn.kv_cache_write(cache, torch.arange(128, device=dev), x)
    assert torch.equal(cache.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    bs, width = 16, 129
    tables = torch.randperm(4 * width, device=dev).view(4, width).to(torch.int32)
    k8 = (torch.randn(4 * width * bs, 8, 128, device=dev) * 40).to(torch.float8_e4m3fn)
    v8 = (torch.randn(4 * width * bs, 8, 128, device=dev) * 40).to(torch.float8_e4m3fn)
    lens = torch.tensor([1, 700, 2049, 33], dtype=torch.int32, device=dev)
    sinks = torch.randn(32, device=dev)
    qd = torch.randn(4, 32, 128, device=dev, dtype=dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for window, s in ((None, None), (512, sinks)):
        want = torch_ops.paged_attention_decode(qd.float(), k8, v8, tables, lens, bs, 0.01, window, None, s)
        torch.testing.assert_close(attn.paged_attention_decode(qd, k8, v8, tables, lens, bs, 0.01, window, None, s),
                                   want.to(dtype), **tol)
    q = torch.randn(505, 32, 128, device=dev, dtype=dtype)
    plens, starts = [1200, 300, 77], [0, 200, 500, 505]
    torch.testing.assert_close(
        attn.paged_attention_prefill(q, k8, v8, tables[:3], plens, starts, bs, 0.01, 256, None, sinks),
        torch_ops.paged_attention_prefill(q, k8, v8, tables[:3], plens, starts, bs, 0.01, 256, None, sinks), **tol)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def test_greedy_on_cuda_matches_transformers_on_cpu(tiny_llama):
    transformers = pytest.importorskip("transformers")
    svc = ModelService(ServiceOptions(model_id=str(tiny_llama), dtype="f32", device="cuda", pa_context_len=1024,
                                      pa_blk_size=16))
    try:
        assert svc.device == "cuda" and svc.backend.name == "paged"
        ids = svc.encode_chat([{"role": "user", "content": "Tell me about the weather today"}])
        done, _ = P.collect(svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=24,
                                                               ignore_eos=True)))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tuple(done.choices[0].token_ids) == tuple(ref[0, len(ids):].tolist())
    finally:
        svc.shutdown()


def test_demo_model_serves_on_cuda_in_bf16():
    svc = ModelService(ServiceOptions(model_id="demo", dtype="bf16", device="cuda", pa_memory_mb=256))
    try:
        ids = svc.encode_chat([{"role": "user", "content": "hello"}])
        done, _ = P.collect(svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=8,
                                                               ignore_eos=True)))
        assert len(done.choices[0].token_ids) == 8
    finally:
        svc.shutdown()
