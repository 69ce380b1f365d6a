"""Parity of deepseekv2 and deepseekv3 (multi-head latent attention, grouped MoE) with transformers.

The ParitySuite checks (fp32 logits within 1e-4, 32 greedy tokens over the KV cache, flattened
batches == per sequence, bf16, ISQ, GPTQ, UQFF), plus: the greedy tokens through the paged
backend's batched decode kernel, the compressed latent cache (one KV head of kv_lora_rank +
qk_rope_head_dim, no value storage) against ``MISTRALRS_NO_MLA=1``'s full K/V (same logits and
tokens, bytes per token), and prefix caching through the engine.

Cases (tiny, three layers: layer 0 dense, 1-2 MoE with a shared expert, 8 experts in 4 groups):
deepseekv2 - V2-Lite's attention (no q LoRA), softmax ``group_limited_greedy`` top-2 of the 2 best
  groups scaled by ``routed_scaling_factor``, yarn rope with mscale != mscale_all_dim (cos/sin
  factor and the softmax-scale correction both != 1);
deepseekv3 - q LoRA, sigmoid ``noaux_tc`` routing with a non-zero ``e_score_correction_bias``,
  renormalised and scaled, yarn rope;
deepseekv3_fused - transformers 5's fused expert layout, ``rope_interleave`` false (halves
  rotation), default rope, no renormalisation, one layer per group choice (``topk_group`` 1).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.parity import ParitySuite, make_tiny_hf_model, tiny_fixture

transformers = pytest.importorskip("transformers")

_COMMON = dict(num_hidden_layers=3, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
               first_k_dense_replace=1, num_key_value_heads=4, n_group=4, topk_group=2)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}


def _v2(p, **kw):
    kw = {**_COMMON, "q_lora_rank": None, "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5,
          "rope_parameters": _YARN, **kw}
    return make_tiny_hf_model(transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, p, **kw)


def _v3(p, *, fused: bool = False, **kw):
    # scoring_func / topk_method as the published V3 config.json has them (llama.cpp's converter reads the first)
    kw = {**_COMMON, "q_lora_rank": 24, "routed_scaling_factor": 2.5, "rope_parameters": _YARN,
          "scoring_func": "sigmoid", "topk_method": "noaux_tc", **kw}
    path, hf = make_tiny_hf_model(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, p, **kw)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a buffer, so randomize_ left it at zero
        for layer in hf.model.layers[hf.config.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.3 * torch.randn(bias.shape, generator=gen))
    hf.save_pretrained(path, **({"save_original_format": False} if fused else {}))
    return path, hf


CASES = {
    "deepseekv2": lambda p: _v2(p),
    "deepseekv3": lambda p: _v3(p),
    "deepseekv3_fused": lambda p: _v3(p, fused=True, rope_interleave=False, norm_topk_prob=False, topk_group=1,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, seed=2),
}

tiny = tiny_fixture(CASES)


def _greedy(path, backend_name: str, prompt: list[int], n: int, *, no_mla: bool, monkeypatch) -> tuple[list[int], int]:
    from mistralrs.loading import build_attention_backend, generate_greedy, load_model

    if no_mla:
        monkeypatch.setenv("MISTRALRS_NO_MLA", "1")
    else:
        monkeypatch.delenv("MISTRALRS_NO_MLA", raising=False)
    loaded = load_model(path, dtype=torch.float32)
    backend = build_attention_backend(loaded, name=backend_name, num_blocks=8, block_size=8)
    tokens = generate_greedy(loaded, backend, prompt, n)
    return tokens, backend.bytes_per_block() // backend.block_size


def _chosen_experts(loaded, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(expert ids [T, k] of every MoE layer, logits) of our model on `ids`."""
    from mistralrs_plugins.models.deepseekv2.model import DeepseekMoE
    from tests.helpers.parity import our_logits

    chosen: list[torch.Tensor] = []
    moes = [layer.ffn for layer in loaded.model.model.layers if isinstance(layer.ffn, DeepseekMoE)]
    for moe in moes:
        def route(x, moe=moe):
            weights, picked = DeepseekMoE.route(moe, x)
            chosen.append(picked.sort(-1).values)
            return weights, picked
        moe.route = route
    try:
        return chosen, our_logits(loaded, ids)
    finally:
        for moe in moes:
            del moe.route


def assert_grouped_moe_bf16_close(path, hf, *, seq_len: int = 24, seed: int = 1) -> dict:
    """bf16 parity for grouped-top-k MoE models: positions where our bf16 run and transformers'
    bf16 run pick different experts in some layer (a near-tie each side rounds differently: the
    sigmoid + bias + group choice makes the router logits' own margin meaningless, so the flips
    are found from the chosen experts themselves) are left out, at most a quarter of them; the
    rest meet `assert_bf16_close`'s two criteria."""
    from mistralrs.loading import load_model
    from tests.helpers.parity import BF16_ATOL

    ids = torch.randint(0, hf.config.vocab_size, (seq_len,), generator=torch.Generator().manual_seed(seed))
    ours_ids, ours = _chosen_experts(load_model(path, dtype=torch.bfloat16), ids)
    hf_bf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16).eval()
    theirs_ids: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _a, out: theirs_ids.append(out[2].sort(-1).values))
             for layer in hf_bf16.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        refbf = hf_bf16(ids[None]).logits[0].float()
        ref32 = hf(ids[None]).logits[0].float()
    for h in hooks:
        h.remove()
    assert len(ours_ids) == len(theirs_ids) > 0
    keep = torch.ones(seq_len, dtype=torch.bool)
    for a, b in zip(ours_ids, theirs_ids):
        keep &= (a == b).all(-1)
    assert keep.sum() >= 0.75 * seq_len, f"{path.name}: routing differs at {int((~keep).sum())} of {seq_len} positions"
    d = {
        "ours_vs_hf_bf16": float((ours - refbf)[keep].abs().max()),
        "ours_bf16_vs_fp32": float((ours - ref32)[keep].abs().max()),
        "hf_bf16_vs_fp32": float((refbf - ref32)[keep].abs().max()),
        "routing_flips": int((~keep).sum()),
    }
    assert d["ours_vs_hf_bf16"] <= BF16_ATOL, f"{path.name}: bf16 max |logit diff| vs transformers {d}"
    assert d["ours_bf16_vs_fp32"] <= 1.5 * d["hf_bf16_vs_fp32"] + 0.02, d
    return d


class TestParity(ParitySuite):
    expected_arch = {name: name.split("_")[0] for name in CASES}
    # What llama.cpp's deepseek2 graph runs: yarn's mscale equal to mscale_all_dim (the file keeps
    # only the latter), the rope key always rotated in pairs.
    gguf_config = {
        "deepseekv2": {"rope_parameters": {**_YARN, "mscale": _YARN["mscale_all_dim"]}},
        "deepseekv3": {"rope_parameters": {**_YARN, "mscale": _YARN["mscale_all_dim"]}},
        "deepseekv3_fused": {"rope_interleave": True},
    }
    # sigmoid routing with a random correction bias: 8-bit weights flip experts (--isq q8_0 gives
    # 0.98 on these 32 positions; the file also quantizes the token table)
    gguf_q8_min_cosine = {"deepseekv3": 0.9}

    def bf16_close(self, name, path, hf):
        return assert_grouped_moe_bf16_close(path, hf)

    def check_layout(self, name, path, model):
        from mistralrs_plugins.models.deepseekv2.model import DeepseekMoE, MultiHeadLatentAttention

        layers = model.model.layers
        assert [type(layer.ffn) is DeepseekMoE for layer in layers] == [False, True, True]
        attn = layers[0].self_attn
        assert isinstance(attn, MultiHeadLatentAttention) and attn.m.absorb
        assert (attn.m.q_lora_rank is None) == (name == "deepseekv2")
        assert model.model.rotary_emb.interleaved == (name != "deepseekv3_fused")
        assert model.kv_cache_shape() == dict(num_layers=3, num_kv_heads=1, head_dim=40, v_head_dim=32,
                                              v_from_k=True)

    def test_paged_latent_cache_vs_full_kv(self, tiny, monkeypatch):
        """Greedy tokens through the paged backend (batched decode kernel over the latent cache)
        equal the reference backend's and the generic full-K/V path's; the latent cache takes
        (kv_lora_rank + rope) per layer and token instead of heads * (qk_head + v_head)."""
        name, path, hf = tiny
        prompt = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(4)).tolist()
        mla_paged, mla_bytes = _greedy(path, "paged", prompt, 16, no_mla=False, monkeypatch=monkeypatch)
        mla_sdpa, _ = _greedy(path, "sdpa", prompt, 16, no_mla=False, monkeypatch=monkeypatch)
        full_paged, full_bytes = _greedy(path, "paged", prompt, 16, no_mla=True, monkeypatch=monkeypatch)
        assert mla_paged == mla_sdpa == full_paged
        assert mla_bytes == 3 * (32 + 8) * 4
        assert full_bytes == 3 * 4 * ((16 + 8) + 16) * 4

    def test_no_mla_logits_match(self, tiny, monkeypatch):
        from tests.helpers.parity import assert_logits_match

        name, path, hf = tiny
        monkeypatch.setenv("MISTRALRS_NO_MLA", "1")
        assert assert_logits_match(path, hf, seq_len=24) <= 1e-4


def test_engine_prefix_cache_and_batching_over_the_latent_cache(tmp_path):
    """Through the engine (paged backend, latent cache): a request whose prompt shares blocks with
    an earlier one reuses them (prefix cache hit) and gives the tokens it gives with no cache at
    all, alone or beside other requests."""
    from mistralrs import protocol as P
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams
    from mistralrs.serving import ModelService, ServiceOptions
    from mistralrs.tokenization import Tokenizer
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    path = tmp_path / "m"
    path.mkdir()
    write_tiny_tokenizer(path)
    _v3(path, vocab_size=Tokenizer.from_dir(path).vocab_size, bos_token_id=0, eos_token_id=1)

    def run(svc, prompts, n=8):
        handles = [svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=0),
                                                       max_tokens=n, ignore_eos=True)) for ids in prompts]
        return [P.collect(h)[0] for h in handles]

    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 300, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(2, 300, (5,), generator=gen).tolist() for _ in range(3)]
    no_cache = ModelService(ServiceOptions(model_id=str(path), dtype="f32", no_kv_cache=True))
    try:
        want = [r.choices[0].token_ids for r in run(no_cache, prompts)]
    finally:
        no_cache.shutdown()
    svc = ModelService(ServiceOptions(model_id=str(path), dtype="f32", pa_blk_size=8, attention_backend="paged",
                                      max_seqs=8))
    try:
        assert svc.backend.shape.v_from_k and svc.backend.shape.num_kv_heads == 1
        first = run(svc, prompts[:1])[0]
        later = run(svc, prompts[1:])  # batched, each hitting the prefix cache
        assert [first.choices[0].token_ids] + [r.choices[0].token_ids for r in later] == want
        assert all(r.usage.cached_tokens >= 32 for r in later)
    finally:
        svc.shutdown()


@pytest.mark.parametrize("era", ["before_split", "whole_and_split"])
def test_gguf_from_older_converters(era, tmp_path, monkeypatch):
    """deepseek2 files of older llama.cpp converters load to the same logits: before it split
    ``kv_b_proj`` (one ``attn_kv_b``, the per-head sizes as ``key_length``/``value_length``, no
    ``*_mla`` keys), and its first split (``attn_kv_b`` beside ``attn_k_b``/``attn_v_b``)."""
    import attrs

    from mistralrs.gguf.loading import load_gguf
    from mistralrs.loading import load_model
    from tests.helpers import gguf_writer
    from tests.helpers.parity import _prompt, our_logits

    def old_hparams(w, cfg):
        gguf_writer.deepseek2_hparams(w, cfg)
        if era == "whole_and_split":
            return
        for key in ("key_length_mla", "value_length_mla"):
            for kv in w.kv_data:
                kv.pop(f"deepseek2.attention.{key}", None)
        w.add_key_length(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
        w.add_value_length(cfg["v_head_dim"])

    def old_modify(name, t, cfg):
        if not name.endswith("kv_b_proj.weight"):
            return gguf_writer.deepseek2_modify(name, t, cfg)
        return [(name, t)] + (gguf_writer.deepseek2_modify(name, t, cfg) if era == "whole_and_split" else [])

    recipe = gguf_writer.RECIPES["DeepseekV2ForCausalLM"]
    monkeypatch.setitem(gguf_writer.RECIPES, "DeepseekV2ForCausalLM",
                        attrs.evolve(recipe, hparams=old_hparams, modify=old_modify))
    path, _ = CASES["deepseekv2"](tmp_path / "m")
    out = gguf_writer.write_gguf(path, tmp_path / "old.gguf")
    got = load_gguf(out, dtype=torch.float32)
    assert "blk.0.attn_kv_b.weight" in got.gguf.tensors
    assert ("blk.0.attn_k_b.weight" in got.gguf.tensors) == (era == "whole_and_split")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    import json
    import shutil

    for f in path.iterdir():
        shutil.copy(f, ref_dir / f.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(TestParity.gguf_config["deepseekv2"])
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    ref = load_model(ref_dir, dtype=torch.float32)
    ids = _prompt(int(ref.config["vocab_size"]), 16, 5)
    torch.testing.assert_close(our_logits(got, ids), our_logits(ref, ids), atol=1e-4, rtol=1e-4)
    got.gguf.close()


def test_gguf_attn_k_b_without_attn_v_b_is_a_one_line_error(tmp_path):
    """A deepseek2 file missing one half of the split kv_b_proj: an error naming the tensor."""
    import gguf as gguf_py

    from mistralrs.errors import ModelLoadError
    from mistralrs.gguf.loading import load_gguf
    from tests.helpers.gguf_writer import write_gguf

    path, _ = CASES["deepseekv2"](tmp_path / "m")
    full = gguf_py.GGUFReader(write_gguf(path, tmp_path / "full.gguf"))
    w = gguf_py.GGUFWriter(tmp_path / "cut.gguf", "deepseek2")
    for key, field in full.fields.items():
        if key.startswith("deepseek2."):
            value = field.contents()
            kind = field.types[0]
            if kind == gguf_py.GGUFValueType.ARRAY:
                w.add_array(key, value)
            else:
                w.add_key_value(key, value, kind)
    for t in full.tensors:
        if t.name != "blk.1.attn_v_b.weight":
            w.add_tensor(t.name, t.data.reshape(list(reversed([int(n) for n in t.shape]))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="blk.1.attn_k_b.weight.*no attn_v_b"):
        load_gguf(tmp_path / "cut.gguf", dtype=torch.float32)
