"""Parity of phi3.5moe, glm4moe and glm4moelite with transformers.

The ParitySuite checks (fp32 logits within 1e-4, 32 greedy tokens over the KV cache, flattened
batches == per sequence, bf16, ISQ, GPTQ, UQFF) plus ``--isq-organization moqe`` (only the routed
experts quantized) and, for glm4moelite, the compressed latent cache through the paged backend.

Cases (tiny):
phimoe - sparsemixer top-2 of 4 (router_jitter_noise 0.01), LayerNorms with biases, q/k/v/o and
  LM-head biases, sliding window 8 (shorter than the sequences), longrope whose short/long
  factors and ``short_mscale`` != 1 change every cos/sin; per-expert ``block_sparse_moe`` names;
phimoe_fused_tied - transformers 5's fused layout (``mlp.router``, ``mlp.experts.gate_up_proj``),
  jitter 0.3 (the second pick's mask keeps several experts), default rope, tied embeddings;
glm4moe - layer 0 dense, 1-2 sigmoid ``noaux_tc`` MoE (8 experts in 4 groups, top-2 of the 2
  best groups) with a non-zero correction bias and a shared expert, renormalised and scaled 2.5,
  per-head QK-norm, q/k/v biases (o none), head_dim 32 != hidden / heads, partial rotary 0.5
  in NeoX halves;
glm4moe_fused - fused layout, first two layers dense, no QK-norm, no biases, no renormalisation,
  partial rotary 0.25 with linear scaling;
glm4moelite - MLA (q LoRA, latent 32 + rope 8), ``mlp_layer_types`` sparse/dense/sparse (not
  expressible by ``first_k_dense_replace``), yarn rope with mscale_all_dim.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.parity import ParitySuite, make_tiny_hf_model, our_logits, tiny_fixture
from tests.parity.test_deepseek_family import assert_grouped_moe_bf16_close
from tests.parity.test_moe_glm_family import assert_moe_bf16_close

transformers = pytest.importorskip("transformers")

_HD = 16
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
             "short_factor": [1.0 + 0.1 * i for i in range(_HD // 2)],
             "long_factor": [2.0 + 0.1 * i for i in range(_HD // 2)], "short_mscale": 1.2, "long_mscale": 1.35}


def _phimoe(p, **kw):
    kw = {"intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}
    return make_tiny_hf_model(transformers.PhimoeConfig, transformers.PhimoeForCausalLM, p, **kw)


def _with_correction_bias(path, hf, *, fused: bool = False):
    """A non-zero ``e_score_correction_bias`` (a buffer, so randomize_ left it at zero), re-saved."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(0.3 * torch.randn(bias.shape, generator=gen))
    hf.save_pretrained(path, **({"save_original_format": False} if fused else {}))
    return path, hf


_GROUPED = dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                n_shared_experts=1, n_group=4, topk_group=2)


def _glm4moe(p, *, fused: bool = False, **kw):
    kw = {**_GROUPED, "head_dim": 32, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, **kw}
    path, hf = make_tiny_hf_model(transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, p, **kw)
    return _with_correction_bias(path, hf, fused=fused)


def _glm4moelite(p, **kw):
    kw = {**_GROUPED, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
          "q_lora_rank": 24, "num_key_value_heads": 4, "routed_scaling_factor": 1.8,
          "mlp_layer_types": ["sparse", "dense", "sparse"],
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8,
                              "beta_fast": 32, "beta_slow": 1}, **kw}
    path, hf = make_tiny_hf_model(transformers.Glm4MoeLiteConfig, transformers.Glm4MoeLiteForCausalLM, p, **kw)
    return _with_correction_bias(path, hf)


def _fused(path, hf):
    hf.save_pretrained(path, save_original_format=False)
    return path, hf


CASES = {
    "phimoe": lambda p: _phimoe(p, head_dim=_HD, attention_bias=True, lm_head_bias=True, sliding_window=8,
                                rope_parameters=_LONGROPE),
    "phimoe_fused_tied": lambda p: _fused(*_phimoe(p, router_jitter_noise=0.3, tie_word_embeddings=True, seed=1)),
    "glm4moe": lambda p: _glm4moe(p, use_qk_norm=True, attention_bias=True),
    "glm4moe_fused": lambda p: _glm4moe(p, fused=True, first_k_dense_replace=2, norm_topk_prob=False, seed=2,
                                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.25}),
    "glm4moelite": lambda p: _glm4moelite(p),
}

EXPECTED_ARCH = {"phimoe": "phi3.5moe", "glm4moe": "glm4moe", "glm4moelite": "glm4moelite"}

tiny = tiny_fixture(CASES)


def assert_moqe_close(path, *, min_cosine: float = 0.95) -> float:
    """``--isq q4k --isq-organization moqe``: exactly the routed experts are quantized (attention,
    dense MLPs, shared experts, routers, embeddings and head stay float) and the logits stay close
    to the float model's."""
    from mistralrs.loading import load_model
    from mistralrs.nn.linear import linear_layers
    from mistralrs.quantization import IsqPlan

    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3))
    ref = our_logits(load_model(path, dtype=torch.float32), ids).flatten()
    plan = IsqPlan("q4k", organization="moqe")
    loaded = load_model(path, dtype=torch.float32, quant_method_for=plan.method_for)
    quantized = {n for n, m in linear_layers(loaded.model) if m.quant_method.describe() != "unquantized"}
    routed = {n for n, _ in linear_layers(loaded.model) if ".experts." in n and "shared" not in n}
    too_narrow = {n for names in plan.fallbacks.values() for n in names}  # shapes no type takes
    assert quantized and quantized <= routed and routed - quantized <= too_narrow, sorted(quantized ^ routed)[:4]
    cos = float(torch.nn.functional.cosine_similarity(our_logits(loaded, ids).flatten(), ref, dim=0))
    assert cos >= min_cosine, f"{path.name} moqe: cosine {cos:.5f}"
    return cos


class TestParity(ParitySuite):
    expected_arch = {name: EXPECTED_ARCH[name.split("_")[0]] for name in CASES}
    tied = frozenset({"phimoe_fused_tied"})
    gguf_vs_transformers = True
    gguf_unsupported = {
        # a deepseek2 file has only a leading dense count (glm4moelite_hub: test_glm4moelite_gguf)
        "glm4moelite": "mlp_layer_types sparse/dense/sparse cannot be written to a deepseek2 GGUF file",
        # PhiMoeModel reads rope's original_max_position_embeddings (the default rope has none) and
        # stacks only per-expert block_sparse_moe tensors; llama.cpp's graph needs output.weight
        "phimoe_fused_tied": "llama.cpp's converter refuses a default-rope, fused-expert, tied Phi-MoE",
    }
    # what a phimoe file does not keep: longrope's short/long mscale (the converter writes one
    # attn_factor, 1 at these lengths); its router_jitter_noise is Phi-3.5-MoE's 0.01, as the case's
    # sigmoid top-2 of 8 with a correction bias: 8-bit weights (the embedding too) flip some picks;
    # the block bytes still equal --isq q8_0's
    gguf_q8_min_cosine = {"glm4moe": 0.97, "glm4moe_fused": 0.97, "glm4moelite_hub": 0.95}
    gguf_config = {"phimoe": {"rope_parameters": {k: v for k, v in _LONGROPE.items() if not k.endswith("mscale")}}}

    def bf16_close(self, name, path, hf):
        if name.startswith("phimoe"):
            return assert_moe_bf16_close(path, hf, hf_router="mlp.router")
        return assert_grouped_moe_bf16_close(path, hf)

    def test_isq_moqe(self, tiny):
        name, path, _ = tiny
        print(name, "moqe cosine", assert_moqe_close(path))

    def check_layout(self, name, path, model):
        from mistralrs.nn.attention import Attention
        from mistralrs_plugins.models.deepseekv2.model import DeepseekMoE, MultiHeadLatentAttention
        from mistralrs_plugins.models.phi3_5moe.model import SparseMixerMoE

        layers = model.model.layers
        rotary = model.model.rotary_emb
        if name.startswith("phimoe"):
            assert all(type(layer.ffn) is SparseMixerMoE for layer in layers)
            assert type(model.model.norm).__name__ == "LayerNorm"
            assert (model.lm_head is not None and model.lm_head.bias is not None) == (name == "phimoe")
            assert rotary.rope_type == ("longrope" if name == "phimoe" else "default")
            return
        moe = [type(layer.ffn) is DeepseekMoE for layer in layers]
        if name.startswith("glm4moelite"):
            assert moe == [True, False, True]
            assert isinstance(layers[0].self_attn, MultiHeadLatentAttention)
            assert model.kv_cache_shape()["v_from_k"]
            return
        assert moe == ([False, True, True] if name == "glm4moe" else [False, False, True])
        attn = layers[0].self_attn
        assert isinstance(attn, Attention) and not rotary.interleaved
        assert rotary.rotary_dim == (16 if name == "glm4moe" else 8)
        assert hasattr(attn, "q_norm") == (name == "glm4moe")


def test_glm4moelite_paged_latent_cache(tmp_path):
    """glm4moelite through the paged backend (batched decode over the latent cache) gives the
    reference backend's greedy tokens."""
    from mistralrs.loading import build_attention_backend, generate_greedy, load_model

    path, hf = _glm4moelite(tmp_path)
    prompt = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    loaded = load_model(path, dtype=torch.float32)
    out = {}
    for backend_name in ("paged", "sdpa"):
        backend = build_attention_backend(loaded, name=backend_name, num_blocks=8, block_size=8)
        out[backend_name] = generate_greedy(loaded, backend, prompt, 16)
    assert out["paged"] == out["sdpa"]


# GGUF-only cases (tests/parity/test_gguf_llama_cpp.py runs llama.cpp's converter on them too).
def _phimoe_hub(p, **kw):
    """Phi-3.5-MoE as the Hub publishes it: ``PhiMoEForCausalLM`` (the name llama.cpp's converter
    knows), per-expert ``block_sparse_moe`` tensors, longrope whose context (256) is 4x the
    original (64), both mscales sqrt(1 + ln 4 / ln 64): the attn_factor llama.cpp's converter
    computes and writes in their place (the file cannot keep the checkpoint's own)."""
    import json
    import math

    mscale = math.sqrt(1 + math.log(4) / math.log(64))
    rope = {**_LONGROPE, "original_max_position_embeddings": 64, "short_mscale": mscale, "long_mscale": mscale}
    path, hf = _phimoe(p, head_dim=_HD, attention_bias=True, lm_head_bias=True, rope_parameters=rope, seed=3, **kw)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["PhiMoEForCausalLM"]}))
    return path, hf


def _glm4moelite_hub(p, **kw):
    """GLM-4.7-Flash as the Hub's config.json says it (``first_k_dense_replace`` 1, one
    multi-token-prediction layer, which llama.cpp's converter counts in block_count), rope default
    (the yarn of the suite's case needs a factor the file keeps as deepseek2's log multiplier)."""
    import json

    path, hf = _glm4moelite(p, mlp_layer_types=["dense", "sparse", "sparse"], seed=4,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1}))
    return path, hf


GGUF_CASES = {"phimoe_hub": _phimoe_hub, "glm4moelite_hub": _glm4moelite_hub}


def test_phimoe_gguf_matches_transformers(tmp_path):
    """A phimoe GGUF file (F32, Q8_0) loads into Phi-3.5-MoE: logits and greedy tokens of the
    safetensors model, the F32 file's logits within 1e-4 of transformers' own, Q8_0 blocks those
    of --isq q8_0."""
    from tests.helpers.gguf_writer import write_gguf
    from tests.helpers.parity import assert_gguf_logits_match_hf, assert_gguf_matches

    path, hf = GGUF_CASES["phimoe_hub"](tmp_path / "phimoe")
    print(assert_gguf_matches(path, tmp_path))
    print("vs transformers", assert_gguf_logits_match_hf(write_gguf(path, tmp_path / "hf.gguf"), hf))


def test_glm4moelite_gguf_runs_as_glm4moelite(tmp_path):
    """GLM-4.7-Flash's GGUF file (``deepseek2``, as llama.cpp writes it) loads as glm4moelite: the
    multi-token-prediction layer left out, the safetensors model's logits and greedy tokens, the
    F32 file within 1e-4 of transformers' own, Q8_0 blocks those of --isq q8_0."""
    from mistralrs.gguf.loading import load_gguf
    from tests.helpers.gguf_writer import write_gguf
    from tests.helpers.parity import assert_gguf_logits_match_hf, assert_gguf_matches

    path, hf = GGUF_CASES["glm4moelite_hub"](tmp_path / "glm")
    print(assert_gguf_matches(path, tmp_path, q8_min_cosine=TestParity.gguf_q8_min_cosine["glm4moelite_hub"]))
    f32 = write_gguf(path, tmp_path / "hf.gguf")
    print("vs transformers", assert_gguf_logits_match_hf(f32, hf))
    loaded = load_gguf(f32, dtype=torch.float32)
    assert loaded.arch.name == "glm4moelite" and loaded.config["num_hidden_layers"] == 3
    assert loaded.config["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    loaded.gguf.close()
