"""mistralrs.nn layers against straightforward references and transformers' modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mistralrs.nn.activation import get_activation
from mistralrs.nn.attention import Attention
from mistralrs.nn.embedding import Embedding, compute_logits
from mistralrs.nn.linear import Linear, LinearMethodBase, UnquantizedLinearMethod
from mistralrs.nn.mlp import MLP, GatedMLP
from mistralrs.nn.moe import MIXTRAL_EXPERT_NAMES, SparseMoE, route_topk
from mistralrs.nn.norm import LayerNorm, RMSNorm

transformers = pytest.importorskip("transformers")


def _fill_(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


# ------------------------------------------------------------------------------------ norms


def test_rmsnorm_matches_llama_rmsnorm_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    _fill_(ours)
    ref.weight.data.copy_(ours.weight)
    x = torch.randn(7, 3, 64) * 3
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_rmsnorm_bf16_keeps_dtype_and_is_close():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-6), LlamaRMSNorm(64, eps=1e-6)
    _fill_(ours)
    ref.weight.data.copy_(ours.weight)
    ours.weight.data = ours.weight.data.bfloat16()
    ref = ref.bfloat16()
    x = torch.randn(5, 64).bfloat16()
    out = ours(x)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding apart at most (ours multiplies by the weight before its single cast)
    torch.testing.assert_close(out.float(), ref(x).float(), atol=2e-2, rtol=1e-2)
    exact = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * ours.weight.float())
    torch.testing.assert_close(out, exact.bfloat16(), atol=0, rtol=0)


def test_rmsnorm_gemma_unit_offset_matches_transformers():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    ours, ref = RMSNorm(32, eps=1e-6, add_unit_offset=True), GemmaRMSNorm(32, eps=1e-6)
    torch.manual_seed(1)
    w = torch.randn(32) * 0.3
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    # bf16: Gemma multiplies in fp32 and casts once, exactly as the kernel does
    ours.weight.data = ours.weight.data.bfloat16()
    ref = ref.bfloat16()
    xb = x.bfloat16()
    torch.testing.assert_close(ours(xb), ref(xb), atol=0, rtol=0)


def test_rmsnorm_uses_the_registered_kernel():
    calls = []

    def fake_kernel(x, w, eps, add_unit_offset=False):
        calls.append(eps)
        return x

    class Spec:
        impl = staticmethod(fake_kernel)

    class FakeRegistry:
        def kernel(self, op, device):
            assert (op, device) == ("rms_norm", "cpu")
            return Spec()

    norm = RMSNorm(8, eps=0.25, registry=FakeRegistry())
    norm.weight.data.fill_(1.0)
    norm(torch.ones(2, 8))
    assert calls == [0.25]


def test_layernorm_matches_torch():
    ours, ref = LayerNorm(16, eps=1e-5), torch.nn.LayerNorm(16, eps=1e-5)
    _fill_(ours)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), ref(x))
    nobias = LayerNorm(16, bias=False)
    nobias.weight.data.fill_(2.0)
    torch.testing.assert_close(nobias(x), F.layer_norm(x, (16,)) * 2.0)


# ------------------------------------------------------------------------------- linear


def test_linear_unquantized_and_bias():
    lin = Linear(8, 4, bias=True)
    assert isinstance(lin.quant_method, UnquantizedLinearMethod)
    assert dict(lin.named_parameters()).keys() == {"weight", "bias"}
    assert lin.weight.shape == (4, 8) and lin.bias.shape == (4,)
    _fill_(lin)
    x = torch.randn(5, 8)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    assert Linear(8, 4).bias is None


class Int8Method(LinearMethodBase):
    """A toy per-row int8 quantizer: weights arrive in fp, quantized after loading."""

    def __init__(self):
        self.processed = 0

    def create_weights(self, layer):
        layer.weight = torch.nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        layer.register_parameter("bias", None)

    def process_after_loading(self, layer):
        self.processed += 1
        w = layer.weight.data.float()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        layer.qweight = torch.nn.Parameter((w / scale).round().to(torch.int8), requires_grad=False)
        layer.scale = torch.nn.Parameter(scale, requires_grad=False)
        del layer.weight

    def apply(self, layer, x):
        return F.linear(x, layer.qweight.float() * layer.scale).to(x.dtype)


def test_linear_method_life_cycle():
    method = Int8Method()
    lin = Linear(16, 8, quant_method=method)
    lin.weight.data.copy_(torch.randn(8, 16))
    ref = lin.weight.data.clone()
    lin.process_after_loading()
    assert method.processed == 1 and "weight" not in dict(lin.named_parameters())
    x = torch.randn(3, 16)
    torch.testing.assert_close(lin(x), x @ ref.T, atol=0.05, rtol=0.05)
    # swapping the method before loading replaces the parameters
    lin2 = Linear(16, 8, bias=True)
    lin2.set_quant_method(Int8Method())
    assert set(dict(lin2.named_parameters())) == {"weight"}


# ------------------------------------------------------------------------------ MLPs


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_mlp_matches_llama_mlp(act):
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act=act, mlp_bias=True)
    ref = LlamaMLP(cfg)
    ours = GatedMLP(32, 48, act, bias=True)
    _fill_(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def _materialized_mlp(act: str, bias: bool, dtype: torch.dtype = torch.float32) -> GatedMLP:
    """A GatedMLP built on the meta device and materialised as the loader does it."""
    from mistralrs.loading import materialize

    with torch.device("meta"):
        mlp = GatedMLP(32, 48, act, bias=bias).to(dtype)
    materialize(mlp, "cpu")
    return mlp


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_fuses_gate_and_up_after_materialize(act, dtype):
    """After materialisation gate and up are halves of one tensor under their own names; loading
    into them and running the fused path gives the unfused result."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    ref = LlamaMLP(transformers.LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act=act, mlp_bias=True))
    _fill_(ref)
    ref = ref.to(dtype)
    mlp = _materialized_mlp(act, bias=True, dtype=dtype)
    assert set(dict(mlp.named_parameters())) == set(ref.state_dict())  # no new names
    with torch.no_grad():  # what the loader does: copy into each parameter in place
        params = dict(mlp.named_parameters())
        for name, value in ref.state_dict().items():
            params[name].copy_(value)
    fused = mlp._fused()
    assert fused is not None
    assert mlp.gate_proj.weight.data_ptr() == fused.weight.data_ptr()
    assert fused.weight.dtype is dtype and torch.equal(fused.weight[48:], ref.up_proj.weight)
    exact_mlp = copy.deepcopy(ref).double()
    for rows in (1, 5, 40):  # decode-sized and prefill-sized
        x = torch.randn(rows, 32).to(dtype)
        unfused = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        if dtype is torch.float32:
            torch.testing.assert_close(mlp(x), unfused, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mlp(x), ref(x), atol=1e-5, rtol=1e-5)
        else:  # bf16: the fused kernel rounds once where the unfused path rounds twice; both near exact
            exact = exact_mlp(x.double())
            bound = 2.0**-5 * exact.abs().max()
            assert (mlp(x).double() - exact).abs().max() <= bound
            assert (unfused.double() - exact).abs().max() <= bound


def test_gated_mlp_fusion_ends_when_a_weight_is_replaced():
    mlp = _materialized_mlp("silu", bias=False)
    _fill_(mlp)
    assert mlp._fused() is not None
    mlp.up_proj.weight = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)  # e.g. a repack
    x = torch.randn(3, 32)
    expected = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)
    assert mlp._fused() is None


def test_gated_mlp_does_not_fuse_quantized_layers():
    class Method(UnquantizedLinearMethod):
        pass

    from mistralrs.loading import materialize

    with torch.device("meta"):
        mlp = GatedMLP(8, 16)
        mlp.gate_proj.set_quant_method(Method())
    materialize(mlp, "cpu")
    assert mlp._fused() is None


def test_gated_mlp_custom_names():
    mlp = GatedMLP(8, 16, names=MIXTRAL_EXPERT_NAMES)
    assert set(dict(mlp.named_parameters())) == {"w1.weight", "w3.weight", "w2.weight"}
    _fill_(mlp)
    x = torch.randn(2, 8)
    expected = mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x))
    torch.testing.assert_close(mlp(x), expected)


def test_plain_mlp_names_and_values():
    mlp = MLP(8, 32, "gelu_new", names=("c_fc", "c_proj"))
    assert set(dict(mlp.named_parameters())) == {"c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"}
    _fill_(mlp)
    x = torch.randn(3, 8)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    expected = transformers.activations.ACT2FN["gelu_new"](h) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "relu"])
def test_activations_match_transformers(name):
    x = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(get_activation(name)(x), transformers.activations.ACT2FN[name](x), atol=1e-6, rtol=1e-5)


def test_unknown_activation_is_a_load_error():
    from mistralrs.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="unsupported activation 'nope'"):
        get_activation("nope")


# ------------------------------------------------------------------------------ MoE


def test_route_topk_reference():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    w, ids = route_topk(logits, 2, norm_topk_prob=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(w, probs.gather(1, ids))
    w2, _ = route_topk(logits, 2, norm_topk_prob=True)
    torch.testing.assert_close(w2.sum(-1), torch.ones(2))
    torch.testing.assert_close(w2, w / w.sum(-1, keepdim=True))


def _dense_moe_reference(moe: SparseMoE, x: torch.Tensor, norm: bool) -> torch.Tensor:
    """Every expert on every token, weighted by the (masked) routing probabilities."""
    probs = torch.softmax(moe.router(x).float(), -1)
    top = torch.topk(probs, moe.top_k, -1)
    mask = torch.zeros_like(probs).scatter(1, top.indices, 1.0)
    w = probs * mask
    if norm:
        w = w / w.sum(-1, keepdim=True)
    outs = torch.stack([e(x) for e in moe.expert_list], dim=1)  # [T, E, H]
    return (outs * w[..., None]).sum(1)


@pytest.mark.parametrize("norm", [True, False])
def test_sparse_moe_matches_dense_reference(norm):
    torch.manual_seed(0)
    moe = SparseMoE(16, 24, num_experts=6, top_k=2, norm_topk_prob=norm)
    _fill_(moe, seed=3)
    x = torch.randn(9, 16)
    torch.testing.assert_close(moe(x), _dense_moe_reference(moe, x, norm), atol=1e-5, rtol=1e-5)


def stacked_moe(kernel, monkeypatch, dtype=torch.float32, names=MIXTRAL_EXPERT_NAMES):
    """A SparseMoE materialised and loaded as the loader does it, with `kernel` standing in for a fused
    ``moe_experts`` kernel claiming the device (Triton on cuda), and a copy without it."""
    from mistralrs.nn import kernels

    moes = []
    for claimed in (kernel, None):
        monkeypatch.setattr(kernels, "lookup_accelerated", lambda op, device, registry=None, k=claimed: k)
        moe = SparseMoE(16, 24, num_experts=5, top_k=2, expert_names=names).to(dtype)
        for m in moe.modules():
            if hasattr(m, "after_materialize"):
                m.after_materialize()
        _fill_(moe, seed=3)  # "loading"
        for m in moe.modules():
            if hasattr(m, "after_loading"):
                m.after_loading()
        moes.append(moe)
    return moes


def test_sparse_moe_restacks_for_a_fused_kernel(monkeypatch):
    from mistralrs.nn import torch_ops

    calls = []
    fused, loop = stacked_moe(lambda *a: calls.append(1) or torch_ops.moe_experts(*a), monkeypatch)
    assert loop._stacked is None
    w13, w2 = fused._stacked
    assert w13.shape == (5, 48, 16) and w2.shape == (5, 16, 24)
    expert = fused.expert_list[2]
    assert expert.w1.weight.data_ptr() == w13[2].data_ptr() and expert.w2.weight.data_ptr() == w2[2].data_ptr()
    assert expert._fused() is not None  # the expert's own fused gate/up still is its gate and up
    assert torch.equal(fused.state_dict()["experts.2.w3.weight"], loop.state_dict()["experts.2.w3.weight"])
    x = torch.randn(11, 16)
    torch.testing.assert_close(fused(x), loop(x), atol=1e-6, rtol=1e-6)
    assert calls == [1]
    with torch.no_grad():  # a caller replacing an expert's weight ends the stacking
        fused.expert_list[0].w1.weight = torch.nn.Parameter(fused.expert_list[0].w1.weight.clone())
    torch.testing.assert_close(fused(x), loop(x), atol=1e-6, rtol=1e-6)
    assert calls == [1] and fused._stacked is None


def test_moe_experts_reference_is_the_loop():
    from mistralrs.nn import torch_ops

    torch.manual_seed(1)
    moe = SparseMoE(16, 24, num_experts=4, top_k=2)
    _fill_(moe, seed=4)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(7, 16, dtype=torch.bfloat16)
    w, ids = moe.route(x)
    w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.expert_list])
    w2 = torch.stack([e.down_proj.weight for e in moe.expert_list])
    assert torch.equal(torch_ops.moe_experts(x, w, ids, w13, w2), moe(x))


def _load_fused_experts(moe: SparseMoE, hf_block, names):
    gate_n, up_n, down_n = names
    with torch.no_grad():
        moe.router.weight.copy_(hf_block.gate.weight)
        inter = hf_block.experts.down_proj.shape[-1]
        for e, expert in enumerate(moe.expert_list):
            gu = hf_block.experts.gate_up_proj[e]
            getattr(expert, gate_n).weight.copy_(gu[:inter])
            getattr(expert, up_n).weight.copy_(gu[inter:])
            getattr(expert, down_n).weight.copy_(hf_block.experts.down_proj[e])


def test_sparse_moe_matches_mixtral_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    ref = MixtralSparseMoeBlock(cfg).eval()
    _fill_(ref, seed=5)
    moe = SparseMoE(16, 24, 4, 2, norm_topk_prob=True, expert_names=MIXTRAL_EXPERT_NAMES)
    assert "experts.3.w2.weight" in dict(moe.named_parameters())
    _load_fused_experts(moe, ref, MIXTRAL_EXPERT_NAMES)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moe(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_sparse_moe_matches_qwen3_moe_block(norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=20, num_experts=5, num_experts_per_tok=3,
                                      norm_topk_prob=norm)
    torch.manual_seed(0)
    ref = Qwen3MoeSparseMoeBlock(cfg).eval()
    _fill_(ref, seed=6)
    moe = SparseMoE(16, 20, 5, 3, norm_topk_prob=norm, routing_weights_in_model_dtype=True)
    assert "experts.4.gate_proj.weight" in dict(moe.named_parameters()) and "gate.weight" in dict(moe.named_parameters())
    _load_fused_experts(moe, ref, ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(1, 7, 16)
    torch.testing.assert_close(moe(x), ref(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------- embedding / head


def test_embedding_scale_rounds_like_gemma():
    emb = Embedding(10, 8, scale=8 ** 0.5)
    _fill_(emb)
    emb.weight.data = emb.weight.data.bfloat16()
    ids = torch.tensor([1, 4])
    expected = F.embedding(ids, emb.weight) * torch.tensor(8 ** 0.5, dtype=torch.bfloat16)
    torch.testing.assert_close(emb(ids), expected, atol=0, rtol=0)


def test_compute_logits_tied_untied_softcap():
    emb = Embedding(10, 4)
    _fill_(emb)
    h = torch.randn(3, 4)
    tied = compute_logits(h, None, emb)
    assert tied.dtype == torch.float32
    torch.testing.assert_close(tied, h @ emb.weight.T)
    head = Linear(4, 10)
    head.weight.data.copy_(emb.weight)
    head_bf16 = Linear(4, 10)
    head_bf16.weight.data = emb.weight.data.bfloat16()
    assert compute_logits(h.bfloat16(), head_bf16).dtype == torch.float32
    capped = compute_logits(h, head, softcap=2.0)
    torch.testing.assert_close(capped, 2.0 * torch.tanh((h @ emb.weight.T) / 2.0))


# ----------------------------------------------------------------------------- attention


class _RecordingBackend:
    """Reference attention on one causal sequence (no cache); records the call."""

    def __init__(self):
        self.calls = []

    def attend(self, layer, q, k, v, batch, *, scale, sliding_window=None, softcap=None):
        self.calls.append(dict(layer=layer, scale=scale, sliding_window=sliding_window, softcap=softcap,
                               q=q.shape, k=k.shape, v=v.shape))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        t = q.shape[0]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class _Batch:
    def __init__(self, backend):
        self.backend = backend


@pytest.mark.parametrize("qk_norm", [None, "head", "full"])
def test_attention_projections_gqa_and_qk_norm(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8, layer_idx=3, qkv_bias=True, qk_norm=qk_norm, scale=0.3, sliding_window=5, softcap=20.0)
    _fill_(attn)
    be = _RecordingBackend()
    x = torch.randn(6, 32)
    out = attn(torch.arange(6), x, _Batch(be))
    call = be.calls[0]
    assert call["layer"] == 3 and call["scale"] == 0.3 and call["sliding_window"] == 5 and call["softcap"] == 20.0
    assert call["q"] == (6, 4, 8) and call["k"] == (6, 2, 8)
    # reference
    q = attn.q_proj(x)
    k = attn.k_proj(x)
    v = attn.v_proj(x).view(6, 2, 8)
    if qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.view(6, 4, 8), k.view(6, 2, 8)
    if qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    ref = attn.o_proj(be.attend(0, q, k, v, None, scale=0.3).reshape(6, 32))
    torch.testing.assert_close(out, ref)
    assert ("q_norm.weight" in dict(attn.named_parameters())) == (qk_norm is not None)
