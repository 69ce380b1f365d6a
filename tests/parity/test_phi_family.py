"""Parity of the Phi family (phi2, phi3) and StarCoder2 with transformers.

fp32: all-position logits within 1e-4 of transformers; 32 greedy tokens over the paged KV cache
identical to ``generate(do_sample=False)``; flattened multi-sequence steps equal the per-sequence
results. bf16: ours vs transformers-bf16 within BF16_ATOL, and no further from fp32 than
transformers-bf16 is (see tests/helpers/parity.py).

Every feature that changes the math is switched on in some case: Phi's parallel block, partial
rotary (0.5 default, 0.25), QK LayerNorm, biased tied head; Phi-3's fused projections, longrope
with short factors (all positions < original_max_position_embeddings) and with long factors
(all > it) plus attention scaling, partial rotary 0.75 (Phi-4-mini), sliding window 8 (shorter
than the 24-48 token sequences), tied/untied; StarCoder2's LayerNorm biases, GELU MLP with and
without biases, sliding window, tied/untied.

Longrope is not tested across the short->long switch inside one sequence: transformers' generate
recomputes its whole cache at that point, our cache keeps the keys rotated with short factors.
"""

from __future__ import annotations

import importlib
import json

import pytest

from tests.helpers.parity import (
    ParitySuite,
    assert_logits_match,
    make_tiny_hf_model,
    tiny_fixture,
)

transformers = pytest.importorskip("transformers")

PLUGINS = {"model_phi2": "phi2", "model_phi3": "phi3", "model_starcoder2": "starcoder2"}


@pytest.fixture(autouse=True)
def _registered():
    """Register the plugins by hand when the installed distribution does not (yet) list their
    entry points (pyproject.toml); a no-op once it does."""
    from mistralrs.plugins import get_plugin_host

    host = get_plugin_host()
    for ep_name, module in PLUGINS.items():
        if ep_name not in host.plugins:
            host.register(importlib.import_module(f"mistralrs_plugins.models.{module}"), name=ep_name,
                          module=f"mistralrs_plugins.models.{module}", distribution="mistralrs", first_party=True)
    yield


def _factors(n: int, lo: float, hi: float) -> list[float]:
    return [round(lo + (hi - lo) * i / max(n - 1, 1), 4) for i in range(n)]


def _phi(p, **kw):
    return make_tiny_hf_model(transformers.PhiConfig, transformers.PhiForCausalLM, p, **kw)


def _phi3(p, **kw):
    kw = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **kw}
    return make_tiny_hf_model(transformers.Phi3Config, transformers.Phi3ForCausalLM, p, **kw)


def _starcoder2(p, **kw):
    kw = {"bos_token_id": 1, "eos_token_id": 2, **kw}
    return make_tiny_hf_model(transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM, p, **kw)


# head_dim 16 in every case (hidden 64, 4 heads); GQA 4:2 from the tiny defaults (phi2_mha: MHA).
CASES = {
    # default partial rotary 0.5, QK LayerNorm, untied head with bias
    "phi2": lambda p: _phi(p, qk_layernorm=True),
    # what a GGUF phi2 file can hold (Phi-2's own layout): MHA, MLP 4 x hidden, theta 10000,
    # no QK LayerNorm, untied head with bias
    "phi2_mha": lambda p: _phi(p, num_key_value_heads=4, intermediate_size=256),
    # tied embeddings (the head keeps its bias), partial rotary 0.25, other theta, 3 layers
    "phi2_tied": lambda p: _phi(
        p, tie_word_embeddings=True, num_hidden_layers=3,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25},
    ),
    # longrope, every position < original_max_position_embeddings (64): short factors and the
    # sqrt(1 + ln(256/64) / ln 64) attention scaling; sliding window 8; untied
    "phi3": lambda p: _phi3(
        p, sliding_window=8, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": _factors(8, 1.0, 3.0), "long_factor": _factors(8, 1.0, 16.0)},
    ),
    # Phi-4-mini: partial rotary 0.75, tied, longrope with every sequence longer than
    # original_max_position_embeddings (4): long factors; no sliding window
    "phi3_long_partial_tied": lambda p: _phi3(
        p, tie_word_embeddings=True, original_max_position_embeddings=4,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": _factors(6, 1.0, 2.0), "long_factor": _factors(6, 1.5, 12.0)},
    ),
    # biases everywhere, sliding window 8, tied (the default)
    "starcoder2": lambda p: _starcoder2(p, sliding_window=8),
    # no biases, untied, no sliding window, explicit norm_epsilon
    "starcoder2_nobias_untied": lambda p: _starcoder2(
        p, use_bias=False, tie_word_embeddings=False, norm_epsilon=1e-3,
    ),
}

EXPECTED_ARCH = {"phi2": "phi2", "phi2_mha": "phi2", "phi2_tied": "phi2", "phi3": "phi3",
                 "phi3_long_partial_tied": "phi3", "starcoder2": "starcoder2", "starcoder2_nobias_untied": "starcoder2"}
TIED = {"phi2_tied", "phi3_long_partial_tied", "starcoder2"}


tiny = tiny_fixture(CASES)


class TestParity(ParitySuite):
    expected_arch = EXPECTED_ARCH
    tied = frozenset(TIED)
    # llama.cpp's phi3 graph disables the sliding window ("Phi SWA is currently disabled"); its
    # starcoder2 converter writes none and its graph has none
    gguf_config = {"phi3": {"sliding_window": None}, "starcoder2": {"sliding_window": None}}
    gguf_unsupported = {
        "phi2": "llama.cpp's phi2 has no QK LayerNorm (its converter cannot map q_layernorm), and the converter "
                "writes head_count_kv = head_count, so GQA (4:2) does not fit",
        "phi2_tied": "llama.cpp's phi2 converter writes head_count_kv = head_count (GQA 4:2 does not fit) and no "
                     "rope theta (500 here), and its graph requires output.weight (a tied Phi has only its bias)",
        "starcoder2_nobias_untied": "llama.cpp's starcoder2 requires the attn_output / ffn_up / ffn_down biases",
    }

    def is_tied(self, model):
        return model.tied_embeddings  # the tied Phi-2 head keeps a Linear for its bias

    def check_layout(self, name, path, model):
        if name == "phi2_tied":
            assert model.lm_head.bias is not None  # the tied Phi head keeps its own bias
        if name.startswith("phi3"):
            attn = model.model.layers[0].self_attn
            assert hasattr(attn, "qkv_proj") and hasattr(model.model.layers[0].mlp, "gate_up_proj")  # kept fused
        rotary = model.model.rotary_emb
        expected_rotary = {"phi2": 8, "phi2_mha": 8, "phi2_tied": 4, "phi3_long_partial_tied": 12}.get(name, 16)
        assert rotary.rotary_dim == expected_rotary
        if name == "phi3" or name == "starcoder2":
            assert model.model.layers[0].self_attn.sliding_window == 8


def _legacy_config(cfg: dict) -> dict:
    """The config.json layout of the published checkpoints (written by transformers 4):
    ``rope_scaling`` {"type": ...} (null when default), top-level rope_theta,
    partial_rotary_factor and original_max_position_embeddings."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    orig = rope.pop("original_max_position_embeddings", None)
    if orig is not None:
        cfg["original_max_position_embeddings"] = orig
    rope_type = rope.pop("rope_type")
    # Phi-3-mini-128k says "longrope", the first Phi-3 releases said "su"
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": "su" if cfg.get("sliding_window") else rope_type, **rope}
    return cfg


@pytest.mark.parametrize("name", ["phi2_tied", "phi3", "phi3_long_partial_tied"])
def test_legacy_rope_config_layout(name, tmp_path):
    """The same weights with a transformers-4 style config.json give the same logits."""
    path, hf = CASES[name](tmp_path / "new")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cfg = _legacy_config(json.loads((path / "config.json").read_text()))
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "model.safetensors").symlink_to(path / "model.safetensors")
    assert_logits_match(legacy, hf, atol=1e-4, seq_len=24)


def test_config_defaults_follow_transformers(tmp_path):
    """Keys absent from config.json take the HF config classes' defaults: Phi's partial rotary
    factor 0.5, layer_norm_eps 1e-5 and gelu_new; StarCoder2's 2 KV heads, tied head and biases."""
    import torch

    from mistralrs_plugins.models.phi2.model import PhiForCausalLM
    from mistralrs_plugins.models.starcoder2.model import Starcoder2ForCausalLM

    base = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    with torch.device("meta"):
        phi = PhiForCausalLM({"model_type": "phi", **base})
        sc2 = Starcoder2ForCausalLM({"model_type": "starcoder2", **base})
    assert phi.model.rotary_emb.rotary_dim == 8
    assert phi.s.norm_eps == 1e-5 and phi.s.hidden_act == "gelu_new" and not phi.tied_embeddings
    assert sc2.s.num_kv_heads == 2 and sc2.tied_embeddings and sc2.s.qkv_bias and sc2.s.mlp_bias
    assert sc2.s.sliding_windows == [None]
    json.dumps(phi.kv_cache_shape())  # plain ints
