"""Parity of Granite and Gemma 3 (text) with transformers.

Same checks as test_llama_family: fp32 all-position logits within 1e-4; 32 greedy tokens over
the paged KV cache identical to ``generate(do_sample=False)``; flattened multi-sequence steps
equal the per-sequence results; bf16 within BF16_ATOL of transformers-bf16.

The configs exercise every feature that changes the math: Granite's embedding / attention /
residual multipliers and logits scaling (all far from 1), tied and untied heads, biases, rope
scaling; Gemma 3's (1 + w) QK-norm, sandwich norms, query_pre_attn_scalar != head_dim, the
sliding/global layer pattern (from ``sliding_window_pattern`` and from explicit
``layer_types``) with windows shorter than the sequences, separate global and local rope
(different thetas, linear scaling on the global layers only), a final softcap
small enough to bite (the attention softcap is ignored, as transformers' Gemma3Attention
ignores it), tied and untied heads, biases, MQA. `test_features_matter` checks that
switching each feature off in our model moves the logits away from transformers', so none of
them passes vacuously; the legacy Gemma 3 config keys (``rope_theta``, ``rope_local_base_freq``,
``rope_scaling``, ``sliding_window_pattern`` without ``layer_types``) are checked separately.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.parity import (
    ParitySuite,
    assert_gguf_matches,
    assert_logits_match,
    make_tiny_hf_model,
    our_logits,
    tiny_fixture,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """The architectures come from the ``model_granite`` / ``model_gemma3`` entry points; in a
    checkout whose installed metadata predates them, register the plugin modules by hand for
    the duration of this module."""
    import importlib

    from mistralrs.plugins import get_plugin_host

    host = get_plugin_host()
    added = []
    for module, arch in (("granite", "granite"), ("gemma3", "gemma3_text")):
        if arch not in host.registry().architectures:
            ep = f"model_{module}"
            host.register(importlib.import_module(f"mistralrs_plugins.models.{module}"), name=ep, first_party=True)
            added.append(ep)
    yield
    for ep in added:
        host.unregister(ep)


def _granite(p, **kw):
    return make_tiny_hf_model(transformers.GraniteConfig, transformers.GraniteForCausalLM, p, **kw)


def _gemma3(p, **kw):
    return make_tiny_hf_model(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, p, **kw)


GEMMA3_ROPE = {
    # global layers: linear scaling; local layers: a much smaller base (both differ from the defaults)
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}

CASES = {
    # untied head, attention + MLP biases, linear rope scaling, every multiplier far from 1
    "granite": lambda p: _granite(
        p, embedding_multiplier=4.0, attention_multiplier=0.05, residual_multiplier=0.4, logits_scaling=2.5,
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    # tied head (Granite 3.x), MQA, head_dim != hidden / heads, multipliers on the other side of 1
    # (Granite 3.x's own values, e.g. embedding 12 / residual 0.22, make a tied random tiny
    # model repeat one token forever: its residual stream is all embedding)
    "granite_tied": lambda p: _granite(
        p, tie_word_embeddings=True, num_key_value_heads=1, head_dim=32, num_hidden_layers=3,
        embedding_multiplier=0.25, attention_multiplier=0.0625, residual_multiplier=4, logits_scaling=0.5,
    ),
    # sliding_window_pattern 2 (layers 0, 2 sliding with window 6; layer 1 global), separate
    # global / local rope, query_pre_attn_scalar 20 != head_dim 32, final softcap 3, tied
    "gemma3": lambda p: _gemma3(
        p, head_dim=32, num_hidden_layers=3, sliding_window_pattern=2, sliding_window=6,
        query_pre_attn_scalar=20, final_logit_softcapping=3.0, rope_parameters=GEMMA3_ROPE,
    ),
    # explicit layer_types (global first), untied, q/k/v/o biases, MQA, default rope (global
    # theta 1e6, local 1e4); attn_logit_softcapping 5 is set to check that it is ignored, as
    # transformers' Gemma3Attention ignores it
    "gemma3_layer_types": lambda p: _gemma3(
        p, head_dim=16, layer_types=["full_attention", "sliding_attention"], sliding_window=5,
        attn_logit_softcapping=5.0, tie_word_embeddings=False, attention_bias=True, num_key_value_heads=1,
        query_pre_attn_scalar=12,
    ),
}
EXPECTED_ARCH = {"granite_tied": "granite", "gemma3": "gemma3_text", "gemma3_layer_types": "gemma3_text"}
TIED = {"granite_tied", "gemma3"}


tiny = tiny_fixture(CASES)

# GGUF-only cases (`test_gemma3_gguf_default_pattern`; tests/parity/test_gguf_llama_cpp.py runs
# llama.cpp's converter on them too).
GGUF_CASES = {
    # what a GGUF gemma3 file can hold with a global layer in it: Gemma 3's default pattern
    # (sliding_window_pattern 6, which llama.cpp hard-codes: layer 5 global, the others sliding
    # with window 4), query_pre_attn_scalar = head_dim, separate global (linear-scaled) / local
    # rope, final softcap 3, untied, no biases. Seven random layers are too deep for the suite's
    # bf16 check (transformers-bf16 alone is ~0.35 from fp32 here), so it runs only the GGUF check.
    "gemma3_default_pattern": lambda p: _gemma3(
        p, head_dim=16, num_hidden_layers=7, sliding_window=4, query_pre_attn_scalar=16,
        final_logit_softcapping=3.0, tie_word_embeddings=False, rope_parameters=GEMMA3_ROPE,
    ),
}


class TestParity(ParitySuite):
    # The untied Gemma 3 case has logits up to ~9 (no final softcap, (1 + w) norms around 2):
    # float32 rounding of differently shaped attention calls reaches ~1e-5 there (1e-6 relative).
    batched_atol = {"gemma3_layer_types": 3e-5}
    expected_arch = EXPECTED_ARCH
    tied = frozenset(TIED)
    # llama.cpp's gemma3 scales queries by head_dim ** -0.5 (hidden / heads for the 62-layer 27B)
    # and runs the layer pattern of its default sliding_window_pattern 6 (all of these 3 layers
    # sliding): its converter writes neither query_pre_attn_scalar nor the pattern
    gguf_config = {"gemma3": {"query_pre_attn_scalar": 32, "layer_types": ["sliding_attention"] * 3}}
    gguf_unsupported = {
        "granite_tied": "llama.cpp's granite converter drops head_dim (32 here, not hidden / heads = 16)",
        "gemma3_layer_types": "llama.cpp's gemma3 loads no attn_output bias, and its converter refuses an "
                              "attn_logit_softcapping",
    }


# ---- every exercised feature changes the logits ---------------------------------------------


def _attns(model):
    return [layer.self_attn for layer in model.model.layers]


def _head_dim_scale(m):
    for a in _attns(m):
        a.scale = a.head_dim ** -0.5


def _no_embedding_multiplier(m):
    m.model.embed_tokens.multiplier = 1.0


def _no_residual_multiplier(m):
    for layer in m.model.layers:
        layer.residual_multiplier = 1.0


def _no_logits_scaling(m):
    m.logits_scaling = 1.0


def _no_rope_scaling(m):
    from mistralrs.nn.rotary import RotaryEmbedding

    cfg = {**m.config, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    plain = RotaryEmbedding.from_config(cfg, head_dim=m.s.head_dim)
    for a in _attns(m):
        object.__setattr__(a, "rotary", plain)


def _no_final_softcap(m):
    m.s.final_softcap = None


def _no_sliding(m):
    for a in _attns(m):
        a.sliding_window = None


def _no_qk_norm(m):
    for a in _attns(m):
        a.qk_norm = None


def _no_sandwich(m):
    """Gemma 1's block instead of Gemma 2/3's: post_attention_layernorm as the pre-MLP norm."""
    from mistralrs.nn.decoder import DecoderLayer

    for layer in m.model.layers:
        layer.forward = DecoderLayer.forward.__get__(layer)


def _global_rope_everywhere(m):
    for a in _attns(m):
        object.__setattr__(a, "rotary", m.model.rotary_emb)


def _local_rope_everywhere(m):
    for a in _attns(m):
        object.__setattr__(a, "rotary", m.model.rotary_emb_local)


def _no_embed_scale(m):
    m.model.embed_tokens.scale = None


MUTATIONS = {
    "granite": [_no_embedding_multiplier, _head_dim_scale, _no_residual_multiplier, _no_logits_scaling,
                _no_rope_scaling],
    "granite_tied": [_no_embedding_multiplier, _head_dim_scale, _no_residual_multiplier, _no_logits_scaling],
    "gemma3": [_no_final_softcap, _no_sliding, _head_dim_scale, _no_qk_norm, _no_sandwich,
               _global_rope_everywhere, _local_rope_everywhere, _no_embed_scale],
    "gemma3_layer_types": [_no_sliding, _head_dim_scale, _no_qk_norm,
                           _global_rope_everywhere, _local_rope_everywhere],
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


def test_gemma3_gguf_default_pattern(tmp_path):
    """A GGUF gemma3 file runs llama.cpp's layer pattern (5 of every 6 layers sliding) with the
    local rope base on the sliding layers and the global base + scaling on the global one: the
    same logits as the safetensors model, whose config says the same in its own keys."""
    from mistralrs.gguf.loading import load_gguf
    from tests.helpers.gguf_writer import write_gguf

    path, _ = GGUF_CASES["gemma3_default_pattern"](tmp_path / "gemma3")
    print(assert_gguf_matches(path, tmp_path))
    loaded = load_gguf(write_gguf(path, tmp_path / "model.gguf"), dtype=torch.float32)
    assert [layer.self_attn.sliding_window for layer in loaded.model.model.layers] == [4, 4, 4, 4, 4, None, 4]
    loaded.gguf.close()


# ---- Gemma 3's legacy config keys ------------------------------------------------------------


def _rewrite_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gemma3_legacy_rope_keys(tmp_path):
    """Pre-transformers-5 configs: global ``rope_theta`` + ``rope_scaling`` (global layers only)
    and local ``rope_local_base_freq`` instead of a nested ``rope_parameters``."""
    path, hf = _gemma3(
        tmp_path / "gemma3", head_dim=16, num_hidden_layers=3, sliding_window_pattern=3, sliding_window=6,
        rope_theta=20000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    assert hf.config.rope_parameters["full_attention"]["factor"] == 4.0
    assert hf.config.rope_parameters["sliding_attention"]["rope_theta"] == 100.0

    def legacy(cfg):
        del cfg["rope_parameters"]
        cfg.update(rope_theta=20000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0})

    assert_logits_match(_rewrite_config(path, tmp_path / "legacy", legacy), hf, atol=1e-4, seq_len=24)


def test_gemma3_defaults_from_pattern_only(tmp_path):
    """No ``layer_types`` and no rope keys at all: the layer pattern comes from
    ``sliding_window_pattern`` (and its default 6), the thetas from Gemma3TextConfig's defaults."""
    path, hf = _gemma3(tmp_path / "gemma3", head_dim=16, num_hidden_layers=7, sliding_window=4,
                       num_attention_heads=2, num_key_value_heads=1)
    assert hf.config.layer_types[5] == "full_attention" and hf.config.layer_types.count("full_attention") == 1

    def bare(cfg):
        for key in ("layer_types", "rope_parameters", "sliding_window_pattern", "_sliding_window_pattern"):
            cfg.pop(key, None)

    assert_logits_match(_rewrite_config(path, tmp_path / "bare", bare), hf, atol=1e-4, seq_len=24)
    from mistralrs.loading import load_model

    loaded = load_model(tmp_path / "bare", dtype="f32")
    windows = [layer.self_attn.sliding_window for layer in loaded.model.model.layers]
    assert windows == [4, 4, 4, 4, 4, None, 4]


def test_gemma3_rejects_bidirectional(tmp_path):
    from mistralrs.errors import ModelLoadError
    from mistralrs_plugins.models.gemma3.model import Gemma3ForCausalLM

    cfg = {"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8, "use_bidirectional_attention": True}
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        Gemma3ForCausalLM.settings(cfg)
