"""Parity of the Gemma family (gemma, gemma2) and SmolLM3 with transformers.

Same checks as test_llama_family: fp32 all-position logits within 1e-4; 32 greedy tokens over
the paged KV cache identical to ``generate(do_sample=False)``; flattened multi-sequence steps
equal the per-sequence results; bf16 within BF16_ATOL of transformers-bf16.

The configs exercise every feature that changes the math (explicit head_dim != hidden/heads,
(1 + w) norms, sqrt(hidden) embedding scale, tied and untied heads, biases, linear rope
scaling, Gemma 2's sandwich norms / query_pre_attn_scalar / attention and final softcaps small
enough to bite / default and explicit sliding layer patterns with windows shorter than the
sequences, SmolLM3's NoPE layers from the interval rule and from an explicit list, its
sliding-window rule), and `test_features_matter` checks that switching each feature off in our
model moves the logits away from transformers', so none of them passes vacuously.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.parity import (
    ParitySuite,
    assert_logits_match,
    make_tiny_hf_model,
    our_logits,
    tiny_fixture,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """The architectures come from the ``model_gemma`` / ``model_gemma2`` / ``model_smollm3``
    entry points; in a checkout whose installed metadata predates them, register the plugin
    modules by hand for the duration of this module."""
    import importlib

    from mistralrs.plugins import get_plugin_host

    host = get_plugin_host()
    added = []
    for name in ("gemma", "gemma2", "smollm3"):
        if name not in host.registry().architectures:
            ep = f"model_{name}"
            host.register(importlib.import_module(f"mistralrs_plugins.models.{name}"), name=ep, first_party=True)
            added.append(ep)
    yield
    for ep in added:
        host.unregister(ep)


def _gemma(p, **kw):
    return make_tiny_hf_model(transformers.GemmaConfig, transformers.GemmaForCausalLM, p, **kw)


def _gemma2(p, **kw):
    return make_tiny_hf_model(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, p, **kw)


def _smollm3(p, **kw):
    # SmolLM3Config's special-token ids (128000+) do not fit the tiny vocabulary
    kw = {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, **kw}
    return make_tiny_hf_model(transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, p, **kw)


CASES = {
    # tied head (Gemma's default), head_dim 32 != hidden / heads (16), q/k/v/o biases, MQA,
    # linear rope scaling (untied heads: the gemma2 and smollm3 cases below)
    "gemma": lambda p: _gemma(
        p, head_dim=32, attention_bias=True, num_key_value_heads=1,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    # what a GGUF gemma file can hold: no biases (llama.cpp's gemma has no attn_output bias), no
    # rope scaling (its converter writes none); head_dim 32, tied
    "gemma_nobias": lambda p: _gemma(p, head_dim=32),
    # default layer pattern (layers 0 and 2 sliding, window 8), query_pre_attn_scalar != head_dim,
    # attention softcap 5 and final softcap 3 (both small enough to change the logits), tied
    "gemma2": lambda p: _gemma2(
        p, head_dim=32, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=20,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),
    # explicit layer_types (the opposite of the default pattern), untied, biases, no final softcap
    "gemma2_layer_types": lambda p: _gemma2(
        p, head_dim=16, layer_types=["full_attention", "sliding_attention"], sliding_window=6,
        tie_word_embeddings=False, attention_bias=True, final_logit_softcapping=None,
        attn_logit_softcapping=8.0, query_pre_attn_scalar=12,
    ),
    # NoPE every 2nd layer (layers 1, 3), sliding window 8 on the NoPE layers, tied
    "smollm3": lambda p: _smollm3(
        p, num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=8,
    ),
    # explicit no_rope_layers and layer_types, untied, attention and MLP biases
    "smollm3_explicit": lambda p: _smollm3(
        p, num_hidden_layers=3, no_rope_layers=[0, 1, 1], use_sliding_window=True, sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
    ),
}
EXPECTED_ARCH = {"gemma_nobias": "gemma", "gemma2_layer_types": "gemma2", "smollm3_explicit": "smollm3"}
TIED = {"gemma", "gemma_nobias", "gemma2", "smollm3"}


tiny = tiny_fixture(CASES)


class TestParity(ParitySuite):
    expected_arch = EXPECTED_ARCH
    tied = frozenset(TIED)
    gguf_config = {
        # llama.cpp's gemma2 scales queries by head_dim ** -0.5 (hidden / heads for the 46-layer 27B),
        # not by query_pre_attn_scalar, which its converter does not write
        "gemma2": {"query_pre_attn_scalar": 32},
        # llama.cpp's smollm3 hard-codes NoPE on every 4th layer and has no sliding window; the
        # converter writes neither no_rope_layers nor the window
        "smollm3": {"no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4, "use_sliding_window": False,
                    "sliding_window": None, "layer_types": None},
    }
    gguf_unsupported = {
        "gemma": "llama.cpp's gemma loads no attn_output bias (and its converter writes no rope scaling)",
        "gemma2_layer_types": "llama.cpp's gemma2 loads no attn_output bias and always reuses the embeddings as "
                              "the head (the converter drops lm_head.weight); its converter also fails on "
                              "final_logit_softcapping null",
        "smollm3_explicit": "llama.cpp's smollm3 loads no attn_output or MLP biases",
    }


# ---- every exercised feature changes the logits ---------------------------------------------


def _attns(model):
    return [layer.self_attn for layer in model.model.layers]


def _no_final_softcap(m):
    m.s.final_softcap = None


def _no_attn_softcap(m):
    for a in _attns(m):
        a.softcap = None


def _no_sliding(m):
    for a in _attns(m):
        a.sliding_window = None


def _head_dim_scale(m):
    for a in _attns(m):
        a.scale = a.head_dim ** -0.5


def _no_embed_scale(m):
    m.model.embed_tokens.scale = None


def _no_sandwich(m):
    """Gemma 1's block instead of Gemma 2's: post_attention_layernorm as the pre-MLP norm."""
    from mistralrs.nn.decoder import DecoderLayer

    for layer in m.model.layers:
        layer.forward = DecoderLayer.forward.__get__(layer)


def _rope_everywhere(m):
    for a in _attns(m):
        object.__setattr__(a, "rotary", m.model.rotary_emb)


def _no_rope_scaling(m):
    from mistralrs.nn.rotary import RotaryEmbedding

    cfg = {**m.config, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    plain = RotaryEmbedding.from_config(cfg, head_dim=m.s.head_dim)
    for a in _attns(m):
        object.__setattr__(a, "rotary", plain)


MUTATIONS = {
    "gemma": [_no_embed_scale, _no_rope_scaling],
    "gemma_nobias": [_no_embed_scale],
    "gemma2": [_no_final_softcap, _no_attn_softcap, _no_sliding, _head_dim_scale, _no_sandwich],
    "gemma2_layer_types": [_no_attn_softcap, _no_sliding, _head_dim_scale],
    "smollm3": [_no_sliding, _rope_everywhere],
    "smollm3_explicit": [_no_sliding, _rope_everywhere],
}


def test_features_matter(tiny):
    from mistralrs.loading import load_model

    name, path, hf = tiny
    ids = torch.randint(0, hf.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    for mutate in MUTATIONS[name]:
        loaded = load_model(path, dtype="f32")
        mutate(loaded.model)
        diff = float((our_logits(loaded, ids) - ref).abs().max())
        assert diff > 1e-2, f"{name}: {mutate.__name__} changes the logits by only {diff:.3g}; the test config does not exercise it"


def test_gemma_legacy_gelu_means_tanh(tmp_path):
    """Official Gemma 1 configs say ``hidden_act: "gelu"``; transformers runs the tanh approximation."""
    path, hf = _gemma(tmp_path / "gemma", head_dim=32)
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (legacy / "config.json").write_text(json.dumps(cfg))
    assert_logits_match(legacy, hf, atol=1e-4, seq_len=24)
