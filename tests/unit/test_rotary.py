"""Rotary embeddings: every rope type against transformers' own rotary modules and
``apply_rotary_pos_emb`` (the reference; imported only here, in tests)."""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field

import pytest
import torch

from mistralrs.errors import ModelLoadError
from mistralrs.nn.rotary import SUPPORTED_ROPE_TYPES, RotaryEmbedding, resolve_rope_parameters

transformers = pytest.importorskip("transformers")

ATOL = 1e-5

# Phi-3-mini-128k / Phi-3-vision-128k config.json (the early "su" spelling of longrope).
PHI3_LONG_FACTOR = [
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
    1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
    1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164,
    5.489999771118164, 9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
    15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203,
    32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
    56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844,
    61.190006256103516, 61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
    63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625,
    64.80001068115234, 64.81001281738281, 64.81001281738281,
]
PHI3_SHORT_FACTOR = [
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002, 1.4000000000000004,
    1.4500000000000004, 1.5500000000000005, 1.8500000000000008, 1.9000000000000008, 2.000000000000001,
    *([2.000000000000001] * 18), 2.1000000000000005, 2.1000000000000005, 2.2, 2.3499999999999996,
    2.3499999999999996, 2.3499999999999996, 2.3499999999999996, 2.3999999999999995, 2.3999999999999995,
    2.6499999999999986, 2.6999999999999984, 2.8999999999999977, 2.9499999999999975, 3.049999999999997,
    3.049999999999997, 3.049999999999997,
]
assert len(PHI3_LONG_FACTOR) == len(PHI3_SHORT_FACTOR) == 48


@dataclass
class Case:
    id: str
    family: str  # transformers.models.<family>.modeling_<family>
    rope_cls: str
    config_cls: str
    raw: dict  # config.json as it appears on the Hub
    head_dim: int
    split: bool = False  # HF attention slices q[..., :rotary_dim] itself (Phi-2, StableLM)
    extra: dict = field(default_factory=dict)


def _llama(**kw) -> dict:
    base = dict(
        model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
    )
    base.update(kw)
    return base


CASES = [
    Case("llama2-default", "llama", "LlamaRotaryEmbedding", "LlamaConfig",
         _llama(num_key_value_heads=32, rope_scaling=None), 128),
    Case("llama-linear-type-key", "llama", "LlamaRotaryEmbedding", "LlamaConfig",
         _llama(rope_scaling={"type": "linear", "factor": 4.0}), 128),
    Case("llama-dynamic", "llama", "LlamaRotaryEmbedding", "LlamaConfig",
         _llama(rope_scaling={"type": "dynamic", "factor": 2.0}), 128),
    Case("llama3.1-8b-llama3", "llama", "LlamaRotaryEmbedding", "LlamaConfig",
         _llama(max_position_embeddings=131072, rope_theta=500000.0,
                rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}), 128),
    Case("qwen2.5-7b-yarn4", "qwen2", "Qwen2RotaryEmbedding", "Qwen2Config",
         dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
              max_position_embeddings=131072, rope_theta=1000000.0,
              rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}), 128),
    Case("deepseek-style-yarn-mscale", "llama", "LlamaRotaryEmbedding", "LlamaConfig",
         _llama(max_position_embeddings=163840,
                rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}), 128),
    Case("gpt-oss-style-yarn-untruncated", "llama", "LlamaRotaryEmbedding", "LlamaConfig",
         _llama(hidden_size=2880, num_attention_heads=64, head_dim=64, max_position_embeddings=131072,
                rope_theta=150000.0,
                rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "truncate": False, "original_max_position_embeddings": 4096}), 64),
    Case("yarn-explicit-attention-factor", "qwen3", "Qwen3RotaryEmbedding", "Qwen3Config",
         dict(model_type="qwen3", hidden_size=1024, num_attention_heads=16, head_dim=128,
              max_position_embeddings=40960, rope_theta=1000000.0,
              rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2,
                            "original_max_position_embeddings": 10240}), 128),
    Case("ministral3-rope_parameters-yarn", "mistral", "MistralRotaryEmbedding", "MistralConfig",
         dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=262144,
              rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                               "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                               "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}), 128),
    Case("phi3-mini-128k-su", "phi3", "Phi3RotaryEmbedding", "Phi3Config",
         dict(model_type="phi3", hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
              max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
              rope_scaling={"long_factor": PHI3_LONG_FACTOR, "short_factor": PHI3_SHORT_FACTOR,
                            "type": "su"}), 96,
         # transformers 5 renames "su" only after standardising, then rejects the dict; give the
         # reference the renamed spelling (what the Hub config says today).
         extra={"hf_raw": dict(model_type="phi3", hidden_size=3072, num_attention_heads=32,
                               num_key_value_heads=32, max_position_embeddings=131072,
                               original_max_position_embeddings=4096, rope_theta=10000.0,
                               rope_scaling={"long_factor": PHI3_LONG_FACTOR,
                                             "short_factor": PHI3_SHORT_FACTOR, "type": "longrope"})}),
    Case("phi4-mini-longrope-partial0.75", "phi3", "Phi3RotaryEmbedding", "Phi3Config",
         dict(model_type="phi3", hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
              max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
              partial_rotary_factor=0.75,
              rope_scaling={"long_factor": [1.0 + 0.6 * i for i in range(48)],
                            "short_factor": [1.0 + 0.01 * i for i in range(48)], "type": "longrope"}), 128),
    Case("qwen3-default", "qwen3", "Qwen3RotaryEmbedding", "Qwen3Config",
         dict(model_type="qwen3", hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rope_scaling=None), 128),
    Case("mistral-7b-default", "mistral", "MistralRotaryEmbedding", "MistralConfig",
         dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
              max_position_embeddings=32768, rope_theta=1000000.0), 128),
    Case("gemma-7b-default", "gemma", "GemmaRotaryEmbedding", "GemmaConfig",
         dict(model_type="gemma", hidden_size=3072, num_attention_heads=16, num_key_value_heads=16,
              head_dim=256, max_position_embeddings=8192, rope_theta=10000.0), 256),
    Case("gemma2-2b-default", "gemma2", "Gemma2RotaryEmbedding", "Gemma2Config",
         dict(model_type="gemma2", hidden_size=2304, num_attention_heads=8, num_key_value_heads=4,
              head_dim=256, max_position_embeddings=8192, rope_theta=10000.0), 256),
    Case("starcoder2-3b-default", "starcoder2", "Starcoder2RotaryEmbedding", "Starcoder2Config",
         dict(model_type="starcoder2", hidden_size=3072, num_attention_heads=24, num_key_value_heads=2,
              max_position_embeddings=16384, rope_theta=999999.4420358813), 128),
    Case("smollm3-default-theta", "smollm3", "SmolLM3RotaryEmbedding", "SmolLM3Config",
         dict(model_type="smollm3", hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
              max_position_embeddings=65536), 128),  # no rope_theta: family default 2e6
    Case("phi2-partial0.4", "phi", "PhiRotaryEmbedding", "PhiConfig",
         dict(model_type="phi", hidden_size=2560, num_attention_heads=32, max_position_embeddings=2048,
              partial_rotary_factor=0.4, rope_theta=10000.0), 80, split=True),
    Case("phi-partial-family-default", "phi", "PhiRotaryEmbedding", "PhiConfig",
         dict(model_type="phi", hidden_size=2048, num_attention_heads=32, max_position_embeddings=2048,
              rope_theta=10000.0), 64, split=True),
    Case("stablelm2-partial0.25", "stablelm", "StableLmRotaryEmbedding", "StableLmConfig",
         dict(model_type="stablelm", hidden_size=2048, num_attention_heads=32, num_key_value_heads=32,
              max_position_embeddings=4096, partial_rotary_factor=0.25, rope_theta=10000), 64, split=True),
    # Hunyuan-7B / A13B: "dynamic" with an alpha is NTK-alpha (a fixed stretched base)
    Case("hunyuan-7b-ntk-alpha", "hunyuan_v1_dense", "HunYuanDenseV1RotaryEmbedding", "HunYuanDenseV1Config",
         dict(model_type="hunyuan_v1_dense", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=32768, rope_theta=10000.0,
              rope_scaling={"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "type": "dynamic"}), 128),
    Case("glm4-9b-interleaved-partial0.5", "glm4", "Glm4RotaryEmbedding", "Glm4Config",
         dict(model_type="glm4", hidden_size=4096, num_attention_heads=32, num_key_value_heads=2,
              head_dim=128, max_position_embeddings=32768, partial_rotary_factor=0.5,
              rope_theta=10000.0), 128),
]


_OURS: dict[str, RotaryEmbedding] = {}


def _ours(case: Case) -> RotaryEmbedding:
    """One module per case for the whole file: building a 128k-position table costs ~0.3 s here."""
    if case.id not in _OURS:
        _OURS[case.id] = RotaryEmbedding.from_config(copy.deepcopy(case.raw), head_dim=case.head_dim)
    return _OURS[case.id]


def _hf_module(case: Case):
    return importlib.import_module(f"transformers.models.{case.family}.modeling_{case.family}")


def _hf_rope(case: Case):
    raw = copy.deepcopy(case.extra.get("hf_raw", case.raw))
    cfg = getattr(transformers, case.config_cls).from_dict(raw)
    return getattr(_hf_module(case), case.rope_cls)(config=cfg)


def _hf_rotate(case: Case, rope, q, k, positions):
    """transformers' result for q/k [T, H, D] at flattened positions of one sequence."""
    cos, sin = rope(q, positions[None])
    cos, sin = cos[0], sin[0]  # [T, rotary_dim]
    apply = _hf_module(case).apply_rotary_pos_emb
    if not case.split:
        return apply(q, k, cos, sin, unsqueeze_dim=1)
    rd = cos.shape[-1]
    q_rot, k_rot = apply(q[..., :rd], k[..., :rd], cos, sin, unsqueeze_dim=1)
    return torch.cat((q_rot, q[..., rd:]), -1), torch.cat((k_rot, k[..., rd:]), -1)


def _position_sets(case: Case) -> list[torch.Tensor]:
    """One prefill-like run below the pretraining length, one decode-like run above it, and a
    scattered set spanning both (its max decides dynamic/longrope like HF's seq_len)."""
    params = resolve_rope_parameters(case.raw)
    mpe = case.raw["max_position_embeddings"]
    orig = params.get("original_max_position_embeddings") or mpe
    g = torch.Generator().manual_seed(0)
    below = torch.cat((torch.arange(0, 24), torch.randint(24, orig - 1, (16,), generator=g), torch.tensor([orig - 1])))
    above = torch.tensor([0, 3, orig - 1, orig, orig + 1, (orig + mpe) // 2, mpe - 2, mpe - 1])
    return [below, above, torch.arange(orig - 4, orig + 4)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_transformers(case: Case):
    ours = _ours(case)
    rope = _hf_rope(case)
    assert ours.attention_scaling == pytest.approx(float(rope.attention_scaling), abs=0, rel=1e-12)
    assert ours.interleaved == (case.family == "glm4")
    g = torch.Generator().manual_seed(1)
    for positions in _position_sets(case):
        rope = _hf_rope(case)  # each set is an independent batch (HF's dynamic module is stateful)
        t = positions.numel()
        q = torch.randn(t, 4, case.head_dim, generator=g)
        k = torch.randn(t, 2, case.head_dim, generator=g)
        ref_q, ref_k = _hf_rotate(case, rope, q, k, positions)
        out_q, out_k = ours(q, k, positions)
        assert out_q.dtype == torch.float32 and out_q.shape == q.shape and out_k.shape == k.shape
        torch.testing.assert_close(out_q, ref_q, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_k, ref_k, atol=ATOL, rtol=0)
        # the tables themselves (HF's cos/sin hold each frequency twice: [freqs | freqs])
        cos, sin = ours.cos_sin(positions)
        ref_cos, ref_sin = rope(q, positions[None])
        half = ours.rotary_dim // 2
        assert cos.shape == (t, half) and cos.dtype == torch.float32
        torch.testing.assert_close(cos, ref_cos[0, :, :half], atol=ATOL, rtol=0)
        torch.testing.assert_close(sin, ref_sin[0, :, :half], atol=ATOL, rtol=0)


def test_rotary_dims_and_pass_through():
    case = next(c for c in CASES if c.id == "phi2-partial0.4")
    ours = RotaryEmbedding.from_config(case.raw, head_dim=80)
    assert ours.rotary_dim == 32 and not ours.interleaved
    q = torch.randn(5, 2, 80)
    out_q, _ = ours(q, q, torch.arange(5))
    assert torch.equal(out_q[..., 32:], q[..., 32:])
    # explicit rotary_dim overrides the factor
    assert RotaryEmbedding.from_config(case.raw, head_dim=80, rotary_dim=80).rotary_dim == 80
    glm = next(c for c in CASES if c.id.startswith("glm4"))
    assert RotaryEmbedding.from_config(glm.raw, head_dim=128, interleaved=False).interleaved is False


def test_dynamic_follows_sequence_length_like_transformers():
    """HF's dynamic module recomputes on growth and resets below max_position_embeddings;
    for that (generation-like) call order the results are identical."""
    case = next(c for c in CASES if c.id == "llama-dynamic")
    ours = _ours(case)
    rope = _hf_rope(case)
    g = torch.Generator().manual_seed(2)
    for length in (100, 4096, 5000, 9000, 100, 12000):
        positions = torch.arange(length - 6, length)
        q = torch.randn(6, 2, 128, generator=g)
        ref_q, ref_k = _hf_rotate(case, rope, q, q, positions)
        out_q, out_k = ours(q, q, positions)
        torch.testing.assert_close(out_q, ref_q, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_k, ref_k, atol=ATOL, rtol=0)
    # stateless: after a longer batch, a shorter-but-still-long one equals a fresh HF module
    positions = torch.arange(7000 - 6, 7000)
    q = torch.randn(6, 2, 128, generator=g)
    ref_q, _ = _hf_rotate(case, _hf_rope(case), q, q, positions)
    torch.testing.assert_close(ours(q, q, positions)[0], ref_q, atol=ATOL, rtol=0)
    # an explicit seq_len (the longest sequence in the batch) selects the frequencies: HF on a
    # batch [short row, long row] uses max(position_ids) + 1 of the whole batch for both rows
    short = torch.arange(0, 8)
    batch = torch.stack((short, torch.arange(9992, 10000)))
    cos, sin = _hf_rope(case)(q, batch)
    q8 = torch.randn(8, 2, 128, generator=g)
    ref_q, _ = _hf_module(case).apply_rotary_pos_emb(q8, q8, cos[0], sin[0], unsqueeze_dim=1)
    torch.testing.assert_close(ours(q8, q8, short, seq_len=10000)[0], ref_q, atol=ATOL, rtol=0)
    assert not torch.allclose(ours(q8, q8, short)[0], ref_q, atol=1e-3)


@pytest.mark.parametrize("case_id", ["phi3-mini-128k-su", "llama-dynamic", "llama3.1-8b-llama3"])
def test_flattened_sequences_equal_per_sequence(case_id):
    case = next(c for c in CASES if c.id == case_id)
    ours = _ours(case)
    a = torch.arange(0, 16)  # a short sequence's prefill
    b = torch.arange(5000, 5016)  # a long sequence's chunk
    g = torch.Generator().manual_seed(3)
    q = torch.randn(32, 4, case.head_dim, generator=g)
    k = torch.randn(32, 2, case.head_dim, generator=g)
    seq_len = 5016
    flat_q, flat_k = ours(q, k, torch.cat((a, b)), seq_len=seq_len)
    qa, ka = ours(q[:16], k[:16], a, seq_len=seq_len)
    qb, kb = ours(q[16:], k[16:], b, seq_len=seq_len)
    torch.testing.assert_close(flat_q, torch.cat((qa, qb)), atol=0, rtol=0)
    torch.testing.assert_close(flat_k, torch.cat((ka, kb)), atol=0, rtol=0)
    # and both equal transformers run on the padded batch [2, 16] (its seq_len is the batch max)
    rope = _hf_rope(case)
    pos = torch.stack((a, b))
    cos, sin = rope(q, pos)
    qh = q.view(2, 16, 4, -1).transpose(1, 2)
    kh = k.view(2, 16, 2, -1).transpose(1, 2)
    ref_q, ref_k = _hf_module(case).apply_rotary_pos_emb(qh, kh, cos, sin)
    torch.testing.assert_close(flat_q, ref_q.transpose(1, 2).reshape(32, 4, -1), atol=ATOL, rtol=0)
    torch.testing.assert_close(flat_k, ref_k.transpose(1, 2).reshape(32, 2, -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case_id", ["llama3.1-8b-llama3", "phi2-partial0.4", "glm4-9b-interleaved-partial0.5"])
def test_bf16_keeps_dtype(case_id):
    case = next(c for c in CASES if c.id == case_id)
    ours = _ours(case)
    positions = torch.tensor([0, 1, 500, 3000])
    q = torch.randn(4, 4, case.head_dim)
    k = torch.randn(4, 2, case.head_dim)
    out_q, out_k = ours(q.bfloat16(), k.bfloat16(), positions)
    assert out_q.dtype == torch.bfloat16 and out_k.dtype == torch.bfloat16
    ref_q, ref_k = ours(q.bfloat16().float(), k.bfloat16().float(), positions)
    torch.testing.assert_close(out_q.float(), ref_q, atol=0.05, rtol=0.02)
    torch.testing.assert_close(out_k.float(), ref_k, atol=0.05, rtol=0.02)
    cos, sin = ours.cos_sin(positions)
    assert cos.dtype == sin.dtype == torch.float32


def test_table_grows_past_max_position_embeddings_and_caches():
    raw = _llama(max_position_embeddings=64)
    ours = RotaryEmbedding.from_config(raw, head_dim=128)
    rope = _hf_rope(Case("x", "llama", "LlamaRotaryEmbedding", "LlamaConfig", raw, 128))
    positions = torch.tensor([3, 63, 64, 1000])
    cos, sin = ours.cos_sin(positions)
    ref_cos, ref_sin = rope(torch.zeros(1), positions[None])
    torch.testing.assert_close(cos, ref_cos[0, :, :64], atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0, :, :64], atol=ATOL, rtol=0)
    assert ours._tables["base"][0].shape[0] >= 1001
    # same positions tensor (every layer of a step): the same answer, recomputed after in-place edits
    again = ours.cos_sin(positions)
    assert again[0] is cos
    positions[0] = 7
    cos2, _ = ours.cos_sin(positions)
    torch.testing.assert_close(cos2[0], rope(torch.zeros(1), torch.tensor([[7]]))[0][0, 0, :64], atol=ATOL, rtol=0)
    # empty input
    c, s = ours.cos_sin(torch.empty(0, dtype=torch.int64))
    assert c.shape == (0, 64) and s.shape == (0, 64)


def test_device_argument_precomputes_table():
    ours = RotaryEmbedding.from_config(_llama(max_position_embeddings=256), head_dim=64, device="cpu")
    assert ours._tables["base"][0].shape == (256, 32)


def test_config_key_precedence():
    # rope_type wins over type; rope_scaling wins over rope_parameters; dict theta wins over top level
    p = resolve_rope_parameters(_llama(
        rope_theta=1.0e4,
        rope_scaling={"type": "dynamic", "rope_type": "linear", "factor": 2.0, "rope_theta": 5.0e5},
        rope_parameters={"rope_type": "default", "rope_theta": 1.0e6},
    ))
    assert p["rope_type"] == "linear" and p["rope_theta"] == 5.0e5 and p["_source_key"] == "rope_scaling"
    p = resolve_rope_parameters(_llama(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert p["rope_type"] == "default" and p["rope_theta"] == 1e6 and p["_source_key"] == "rope_parameters"
    # "su" is Phi-3's early name for longrope (the phi3-mini-128k-su case checks the numbers)
    assert resolve_rope_parameters(dict(max_position_embeddings=8, rope_scaling={
        "type": "su", "short_factor": [1.0], "long_factor": [1.0]}))["rope_type"] == "longrope"
    # Phi-3 keeps original_max_position_embeddings at the top level, and it wins
    p = resolve_rope_parameters(dict(model_type="phi3", max_position_embeddings=131072,
                                     original_max_position_embeddings=4096,
                                     rope_scaling={"type": "longrope", "short_factor": [1.0],
                                                   "long_factor": [1.0],
                                                   "original_max_position_embeddings": 8192}))
    assert p["original_max_position_embeddings"] == 4096
    # per-layer-type rope_parameters (Gemma-3 style)
    nested = dict(model_type="x", max_position_embeddings=8192, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert RotaryEmbedding.from_config(nested, head_dim=64, layer_type="full_attention").rope_type == "linear"
    with pytest.raises(ModelLoadError, match="layer_type"):
        RotaryEmbedding.from_config(nested, head_dim=64)


def test_unknown_rope_type_is_a_model_load_error():
    with pytest.raises(ModelLoadError) as info:
        RotaryEmbedding.from_config(_llama(rope_scaling={"type": "xpos", "scale_base": 512}), head_dim=128)
    msg = str(info.value)
    assert msg == (
        "unsupported rope type 'xpos' in config.json rope_scaling; supported: "
        + ", ".join(SUPPORTED_ROPE_TYPES)
    )
    assert "\n" not in msg
    with pytest.raises(ModelLoadError, match="unsupported rope type 'foo' in config.json rope_parameters"):
        RotaryEmbedding.from_config(_llama(rope_parameters={"rope_type": "foo"}), head_dim=128)


@pytest.mark.parametrize("raw, match", [
    (_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}), "missing 'high_freq_factor'"),
    (_llama(rope_scaling={"type": "linear"}), "missing 'factor'"),
    (_llama(rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}),
     "short_factor has 3 entries; longrope with rotary dim 128 needs 64"),
    (_llama(rope_scaling={"type": "linear", "factor": "big"}), "factor must be a number"),
    (_llama(partial_rotary_factor=0.2), "rotary dim 25 for head_dim 128"),
])
def test_bad_config_errors(raw, match):
    with pytest.raises(ModelLoadError, match=match):
        RotaryEmbedding.from_config(raw, head_dim=128)
