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

import pytest
import torch
from safetensors import safe_open

from tests.helpers.parity import (
    ParitySuite,
    assert_bf16_close,
    check_bf16,
    make_tiny_hf_model,
    our_logits,
    tiny_fixture,
)

transformers = pytest.importorskip("transformers")

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
    # every layer sparse and renormalised: what a GGUF qwen3moe file can hold
    "qwen3moe_sparse": lambda p: _qwen3moe(p, norm_topk_prob=True, num_hidden_layers=2, seed=1),
    # q/k/v biases, partial rotary 0.5 (Glm4Config default), pairwise rotation, head_dim 32
    "glm4": lambda p: _glm4(p, head_dim=32),
    # no biases, rotary on a quarter of the head with linear scaling, tied embeddings
    "glm4_linear_rope_tied": lambda p: _glm4(
        p, head_dim=32, attention_bias=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
}

EXPECTED_ARCH = {"mixtral": "mixtral", "qwen3moe": "qwen3moe", "glm4": "glm4"}


tiny = tiny_fixture(CASES)


# A routing flip needs a top-k margin within bf16 noise: measured max |router logit| error of
# transformers-bf16 vs fp32 on these models is ~0.045, so a flip at a wider fp32 margin is a bug.
NEAR_TIE = 0.2


def _router_logits(modules, run):
    """(router logits [T, E] of each of `modules` in call order, result) of `run()`."""
    caught: list[torch.Tensor] = []

    def grab(_module, _args, out):
        logits = out[0] if isinstance(out, tuple) else out  # HF routers return (logits, weights, ids)
        caught.append(logits.detach().float().reshape(-1, logits.shape[-1]))

    hooks = [m.register_forward_hook(grab) for m in modules]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in hooks:
            h.remove()
    return caught, result


def assert_moe_bf16_close(path, hf, *, seq_len: int = 24, seed: int = 1, hf_router: str = "mlp.gate") -> dict:
    """`assert_bf16_close` for sparse MoE models. Where a token's top-k margin is within bf16
    noise, our bf16 run and transformers' bf16 run may pick different experts for it (each
    rounding a little differently), and that position's logits legitimately differ by more
    than BF16_ATOL. Such positions are left out of the comparison, but only if the flip is a
    near-tie in the fp32 reference (margin < NEAR_TIE) and at most a quarter of the positions
    flip; everywhere else the usual two bf16 criteria hold. `hf_router`: the name of
    transformers' router under each decoder layer, a dotted path (its output, or its first
    output, is the logits)."""
    from mistralrs.loading import load_model
    from mistralrs.nn.moe import SparseMoE

    k = hf.config.num_experts_per_tok
    ids = torch.randint(0, hf.config.vocab_size, (seq_len,), generator=torch.Generator().manual_seed(seed))
    loaded = load_model(path, dtype=torch.bfloat16)
    ours_routers = [layer.ffn.router for layer in loaded.model.model.layers if isinstance(layer.ffn, SparseMoE)]
    ours_r, ours = _router_logits(ours_routers, lambda: our_logits(loaded, ids))
    hf_bf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16).eval()
    def gates(m):
        found = []
        for layer in m.model.layers:
            for part in hf_router.split("."):
                layer = getattr(layer, part, None)
            if layer is not None:
                found.append(layer)
        return found

    ref_r, refbf = _router_logits(gates(hf_bf16), lambda: hf_bf16(ids[None]).logits[0].float())
    r32, ref32 = _router_logits(gates(hf), lambda: hf(ids[None]).logits[0].float())
    assert len(ours_r) == len(ref_r) == len(r32) > 0

    keep = torch.ones(seq_len, dtype=torch.bool)
    for a, b, f in zip(ours_r, ref_r, r32):
        flipped = (a.topk(k, -1).indices.sort(-1).values != b.topk(k, -1).indices.sort(-1).values).any(-1)
        top = f.sort(-1, descending=True).values
        margin = top[:, k - 1] - top[:, k]
        bad = flipped & (margin >= NEAR_TIE)
        assert not bad.any(), f"{path.name}: experts differ at positions {bad.nonzero().flatten().tolist()} " \
                              f"whose fp32 routing margin {margin[bad].tolist()} is no near-tie"
        keep &= ~flipped
    assert keep.sum() >= 0.75 * seq_len, f"{path.name}: routing flipped at {int((~keep).sum())} of {seq_len} positions"
    d = {
        "ours_vs_hf_bf16": float((ours - refbf)[keep].abs().max()),
        "ours_bf16_vs_fp32": float((ours - ref32)[keep].abs().max()),
        "hf_bf16_vs_fp32": float((refbf - ref32)[keep].abs().max()),
        "near_tie_flips": int((~keep).sum()),
    }
    check_bf16(d, path.name)
    return d


class TestParity(ParitySuite):
    expected_arch = {name: EXPECTED_ARCH[name.split("_")[0]] for name in CASES}
    tied = frozenset(name for name in CASES if "tied" in name)
    # llama.cpp's llama (Mixtral) and qwen3moe graphs have no sliding window
    gguf_config = {name: {"sliding_window": None, "use_sliding_window": False} for name in CASES
                   if name.startswith(("mixtral", "qwen3moe"))}
    gguf_unsupported = {
        "qwen3moe": "llama.cpp's qwen3moe has no dense layers and always renormalises the top-k weights",
        "qwen3moe_step_fused_tied": "llama.cpp's qwen3moe has no dense layers",
    }

    def bf16_close(self, name, path, hf):
        moe = name.startswith(("mixtral", "qwen3moe"))
        return assert_moe_bf16_close(path, hf) if moe else assert_bf16_close(path, hf)

    def check_layout(self, name, path, model):
        from mistralrs.nn.moe import SparseMoE

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        fused = any(k.endswith("experts.gate_up_proj") for k in keys)
        assert fused == ("fused" in name), f"{name}: the checkpoint layout is not the one the case means to test"
        moe = [type(layer.ffn) is SparseMoE for layer in model.model.layers]
        expected_moe = {
            "mixtral": [True, True], "mixtral_fused_tied": [True, True],
            "qwen3moe": [False, True, True], "qwen3moe_step_fused_tied": [False, True, False],
            "qwen3moe_sparse": [True, True],
        }.get(name, [False, False])
        assert moe == expected_moe
        if name.startswith("glm4"):
            rotary = model.model.rotary_emb
            assert rotary.interleaved and rotary.rotary_dim == (8 if "linear" in name else 16)
