"""Parity of mixtral, qwen3moe and glm4 with transformers (same checks as the Llama family).

fp32: all-position logits within 1e-4 of transformers; 32 greedy tokens over the paged KV
cache identical to ``generate(do_sample=False)``; flattened multi-sequence steps equal the
per-sequence results. bf16: ours-bf16 vs transformers-bf16 within BF16_ATOL, and no further
from fp32 than transformers-bf16 is.

Every case turns on what changes the math of its family, so a missing feature fails:
mixtral - top-k routing with renormalisation, sliding window (8) shorter than the sequences,
  explicit head_dim, tied embeddings, and both expert-weight layouts (per-expert
  ``block_sparse_moe.experts.N.w1/w2/w3`` as transformers' ``save_pretrained`` writes by default
  and the Hub ships, and the fused ``mlp.experts.gate_up_proj [E, 2I, H]`` of
  ``save_original_format=False``);
qwen3moe - QK-norm, head_dim != hidden / heads, o_proj bias, ``norm_topk_prob`` off and on,
  dense layers from ``mlp_only_layers`` and from ``decoder_sparse_step``,
  ``moe_intermediate_size``, sliding window on every layer, tied embeddings, both layouts;
glm4 - sandwich norms, fused gate_up MLP, partial (0.5 / 0.25) pairwise rotary, q/k/v biases
  (and none), linear rope scaling, tied embeddings.
"""

from __future__ import annotations

import importlib

import pytest
from safetensors import safe_open

from tests.helpers.parity import (
    assert_batched_match,
    assert_bf16_close,
    assert_greedy_match,
    assert_logits_match,
    make_tiny_hf_model,
)

transformers = pytest.importorskip("transformers")

_PLUGIN_MODULES = {
    "model_mixtral": "mistralrs_plugins.models.mixtral",
    "model_qwen3moe": "mistralrs_plugins.models.qwen3moe",
    "model_glm4": "mistralrs_plugins.models.glm4",
}


@pytest.fixture(scope="module", autouse=True)
def _plugins_registered():
    """Until the entry points are installed, register this family's plugin modules in the
    process-wide host for this module only (removed again afterwards)."""
    from mistralrs.plugins import get_plugin_host

    host = get_plugin_host()
    added = []
    for name, module in _PLUGIN_MODULES.items():
        spec_name = name.removeprefix("model_")
        if spec_name not in host.registry().architectures and name not in host.plugins:
            assert host.register(importlib.import_module(module), name=name, module=module, first_party=True)
            added.append(name)
    yield
    for name in added:
        host.unregister(name)


def _fused(path, hf):
    """Re-save in transformers 5's in-memory layout (fused experts, ``mlp.`` names)."""
    hf.save_pretrained(path, save_original_format=False)
    return path, hf


def _mixtral(p, **kw):
    kw = {"intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8, **kw}
    return make_tiny_hf_model(transformers.MixtralConfig, transformers.MixtralForCausalLM, p, **kw)


def _qwen3moe(p, **kw):
    kw = {"num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
          "head_dim": 32, **kw}
    return make_tiny_hf_model(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, p, **kw)


def _glm4(p, **kw):
    return make_tiny_hf_model(transformers.Glm4Config, transformers.Glm4ForCausalLM, p, pad_token_id=0, **kw)


CASES = {
    # 4 experts, top-2, sliding window 8 on every layer; per-expert checkpoint names
    "mixtral": lambda p: _mixtral(p),
    # top-3 of 6, head_dim 32 (!= 64 / 4), tied embeddings; fused checkpoint layout
    "mixtral_fused_tied": lambda p: _fused(*_mixtral(p, num_local_experts=6, num_experts_per_tok=3, head_dim=32,
                                                    tie_word_embeddings=True)),
    # layer 0 dense (mlp_only_layers), top-2 of 8 not renormalised, q/k/v/o biases, sliding window 8
    "qwen3moe": lambda p: _qwen3moe(p, mlp_only_layers=[0], norm_topk_prob=False, attention_bias=True,
                                    use_sliding_window=True, sliding_window=8),
    # decoder_sparse_step 2 (layer 1 sparse, 0 and 2 dense), renormalised, tied; fused layout
    "qwen3moe_step_fused_tied": lambda p: _fused(*_qwen3moe(p, decoder_sparse_step=2, norm_topk_prob=True,
                                                            tie_word_embeddings=True)),
    # q/k/v biases, partial rotary 0.5 (Glm4Config default), pairwise rotation, head_dim 32
    "glm4": lambda p: _glm4(p, head_dim=32),
    # no biases, rotary on a quarter of the head with linear scaling, tied embeddings
    "glm4_linear_rope_tied": lambda p: _glm4(
        p, head_dim=32, attention_bias=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
}

EXPECTED_ARCH = {"mixtral": "mixtral", "qwen3moe": "qwen3moe", "glm4": "glm4"}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    path, hf = CASES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path, hf


def test_fp32_logits(tiny):
    name, path, hf = tiny
    diff = assert_logits_match(path, hf, atol=1e-4, seq_len=24)
    print(name, "fp32 max diff", diff)


def test_greedy_32_tokens(tiny):
    _, path, hf = tiny
    tokens = assert_greedy_match(path, hf, n_tokens=32)
    assert len(set(tokens)) > 1  # not a degenerate repetition: the comparison means something


def test_batched_flattened_equals_per_sequence(tiny):
    _, path, _ = tiny
    assert_batched_match(path)


def test_bf16_logits(tiny):
    name, path, hf = tiny
    diffs = assert_bf16_close(path, hf)
    print(name, "bf16", {k: round(v, 4) for k, v in diffs.items()})


def test_architecture_and_layout(tiny):
    from mistralrs.loading import load_model
    from mistralrs.nn.moe import SparseMoE

    name, path, _ = tiny
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    fused = any(k.endswith("experts.gate_up_proj") for k in keys)
    assert fused == ("fused" in name), f"{name}: the checkpoint layout is not the one the case means to test"
    loaded = load_model(path, dtype="f32")
    assert loaded.arch.name == EXPECTED_ARCH[name.split("_")[0]]
    model = loaded.model
    assert (model.lm_head is None) == ("tied" in name)
    moe = [type(layer.ffn) is SparseMoE for layer in model.model.layers]
    expected_moe = {
        "mixtral": [True, True], "mixtral_fused_tied": [True, True],
        "qwen3moe": [False, True, True], "qwen3moe_step_fused_tied": [False, True, False],
    }.get(name, [False, False])
    assert moe == expected_moe
    if name.startswith("glm4"):
        rotary = model.model.rotary_emb
        assert rotary.interleaved and rotary.rotary_dim == (8 if "linear" in name else 16)
