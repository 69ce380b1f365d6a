"""Parity of the hybrid (recurrent + attention) architectures with transformers' torch paths,
and the recurrent-state cache through the engine.

The ParitySuite checks (fp32 logits within 1e-4, 32 greedy tokens through the paged cache and
the state slots, flattened batches == per sequence with prefill and decode mixed, bf16, ISQ,
GPTQ, UQFF). The prompts are longer than the Mamba chunk size, so the chunked scan carries its
state across chunks; decode steps run the recurrent step.

Cases (tiny):
granitemoehybrid - Mamba-2 / attention / Mamba-2 / Mamba-2 layers, 2 B/C groups, chunk size 8,
  top-2 of 4 experts plus the shared MLP, no rope (Granite 4.0's), the four Granite scalars;
granitemoehybrid_dense_rope_tied - attention then Mamba-2, dense (shared MLP only), rope, tied
  embeddings, one group, chunk size 5;
lfm2 - conv / attention / conv / conv, kernel 3, QK-norm attention, auto-adjusted feed-forward
  width, tied embeddings (LFM2's defaults);
lfm2_bias_untied - ``full_attn_idxs`` [0, 2] (older configs), conv and projection biases, kernel 4,
  the feed-forward width as given, an untied head;
qwen3next - three Gated DeltaNet layers then gated attention (the default interval 4), 2 key heads
  serving 4 value heads, top-4 of 8 experts renormalised plus the gated shared expert, partial
  rotary 0.25, (1 + w) norms;
qwen3next_dense_tied - ``layer_types`` from ``full_attention_interval`` 2, as many key as value
  heads, layer 0 dense (``mlp_only_layers``) and ``decoder_sparse_step`` 2, top-k weights not
  renormalised, tied embeddings.
Qwen3-Next's chunked delta rule works in chunks of 64: `test_qwen3next_prompt_over_one_delta_chunk`
runs a prompt longer than that.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.parity import ParitySuite, assert_bf16_close, make_tiny_hf_model, tiny_fixture
from tests.parity.test_moe_glm_family import assert_moe_bf16_close
from tests.parity.test_phimoe_glm4moe_family import assert_moqe_close

transformers = pytest.importorskip("transformers")

def _granite(p, **kw):
    kw = {"intermediate_size": 32, "shared_intermediate_size": 48, "num_hidden_layers": 4, "num_local_experts": 4,
          "num_experts_per_tok": 2, "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_n_groups": 2,
          "mamba_chunk_size": 8, "embedding_multiplier": 2.0, "attention_multiplier": 0.1,
          "residual_multiplier": 0.5, "logits_scaling": 2.0,
          "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"], **kw}
    path, hf = make_tiny_hf_model(transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM, p, **kw)
    # the Hub's layer names (transformers 5 saves linear_attention / full_attention), which
    # llama.cpp's converter reads
    cfg = json.loads((path / "config.json").read_text())
    hub = {"linear_attention": "mamba", "full_attention": "attention"}
    (path / "config.json").write_text(json.dumps({**cfg, "layer_types": [hub[t] for t in cfg["layer_types"]]}))
    return path, hf


def _lfm2(p, **kw):
    kw = {"intermediate_size": 96, "num_hidden_layers": 4, "layer_types": ["conv", "full_attention", "conv", "conv"],
          "conv_L_cache": 3, "block_multiple_of": 16, **kw}
    return make_tiny_hf_model(transformers.Lfm2Config, transformers.Lfm2ForCausalLM, p, **kw)


def _qwen3next(p, **kw):
    kw = {"intermediate_size": 64, "num_hidden_layers": 4, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 4,
          "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16, **kw}
    path, hf = make_tiny_hf_model(transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM, p, **kw)
    # Qwen3-Next's norms scale by (1 + w) with w near 0 (its init is zeros); randomize_ draws norm
    # weights near 1, which doubles the residual stream at every norm
    gen = torch.Generator().manual_seed(7)
    cfg = hf.config
    dk, r = cfg.linear_key_head_dim, cfg.linear_num_value_heads // cfg.linear_num_key_heads
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__ == "Qwen3NextRMSNorm":
                module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=gen))
            if type(module).__name__ == "Qwen3NextGatedDeltaNet":
                # Each key equals its query (the rows of in_proj_qkvz and the conv channels): random
                # 16-dim queries and keys are near-orthogonal, which leaves the delta rule's read-out
                # near zero, and the per-head RMSNorm after it then blows any rounding (bf16, ISQ) up
                # into noise. With q = k the read-out has a trained model's scale.
                w = module.in_proj_qkvz.weight.view(cfg.linear_num_key_heads, 2 * dk + 2 * r * cfg.linear_value_head_dim, -1)
                w[:, dk:2 * dk] = w[:, :dk]
                key_dim = dk * cfg.linear_num_key_heads
                module.conv1d.weight[key_dim:2 * key_dim] = module.conv1d.weight[:key_dim]
    hf.save_pretrained(path)
    # Qwen3-Next's checkpoints have a multi-token-prediction layer (mtp.*), which llama.cpp's
    # converter counts in its block_count: the count, as config.json keys say it for Qwen3.5
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "mtp_num_hidden_layers": 1}))
    return path, hf


CASES = {
    "granitemoehybrid": lambda p: _granite(p),
    "granitemoehybrid_dense_rope_tied": lambda p: _granite(
        p, num_local_experts=0, position_embedding_type="rope", num_hidden_layers=2, mamba_n_groups=1,
        mamba_chunk_size=5, layer_types=["full_attention", "linear_attention"], tie_word_embeddings=True, seed=1),
    "lfm2": lambda p: _lfm2(p),
    "lfm2_bias_untied": lambda p: _lfm2(p, conv_bias=True, conv_L_cache=4, block_auto_adjust_ff_dim=False,
                                        tie_word_embeddings=False, layer_types=None, full_attn_idxs=[0, 2], seed=1),
    "qwen3next": lambda p: _qwen3next(p),
    "qwen3next_dense_tied": lambda p: _qwen3next(
        p, layer_types=None, full_attention_interval=2, linear_num_key_heads=4, mlp_only_layers=[0],
        decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True, seed=1),
}

tiny = tiny_fixture(CASES)


class TestParity(ParitySuite):
    expected_arch = {name: name.split("_")[0] for name in CASES}
    tied = frozenset({"granitemoehybrid_dense_rope_tied", "lfm2", "qwen3next_dense_tied"})

    gguf_vs_transformers = True
    gguf_unsupported = {
        # llama.cpp's qwen3next graph has a MoE on every layer, renormalised
        "qwen3next_dense_tied": "mlp_only_layers, decoder_sparse_step and norm_topk_prob false cannot be written "
                                "to a qwen3next GGUF file",
        # LFM2Model.modify_tensors squeezes every conv.conv tensor on dim 1, which a conv bias has not
        # (and llama.cpp's lfm2 graph has no conv bias)
        "lfm2_bias_untied": "llama.cpp's converter refuses an LFM2 with conv biases",
    }
    # llama.cpp's converter writes rope off (rope.scaling.finetuned false) for every
    # GraniteMoeHybrid with Mamba layers (Granite 4.0 H has none), and its graph follows the switch
    gguf_config = {"granitemoehybrid_dense_rope_tied": {"position_embedding_type": "nope"}}
    # top-2 of 4 experts: 8-bit weights (the token table too) flip some picks; the block bytes
    # still equal --isq q8_0's
    gguf_q8_min_cosine = {"granitemoehybrid": 0.97}

    def bf16_close(self, name, path, hf):
        if name.startswith("lfm2") or name == "granitemoehybrid_dense_rope_tied":
            return assert_bf16_close(path, hf)
        if name.startswith("qwen3next"):
            return assert_moe_bf16_close(path, hf, hf_router="mlp.gate")
        return assert_moe_bf16_close(path, hf, hf_router="block_sparse_moe.router")

    def test_isq_moqe(self, tiny):
        """--isq-organization moqe on the MoE cases: only the routed experts are quantized."""
        name, path, _ = tiny
        if name not in ("granitemoehybrid", "qwen3next"):
            pytest.skip("no routed experts")
        print(name, "moqe cosine", assert_moqe_close(path))

    def check_layout(self, name, path, model):
        from mistralrs_plugins.models.granitemoehybrid.model import Mamba2Mixer
        from mistralrs_plugins.models.lfm2.model import ShortConv

        if name.startswith("qwen3next"):
            from mistralrs_plugins.models.qwen3next.model import GatedAttention, GatedDeltaNet, SharedExpertMoE

            kinds = [type(layer.mixer) for layer in model.model.layers]
            moe = [isinstance(layer.ffn, SharedExpertMoE) for layer in model.model.layers]
            if name == "qwen3next":
                assert kinds == [GatedDeltaNet] * 3 + [GatedAttention] and all(moe)
            else:
                assert kinds == [GatedDeltaNet, GatedAttention] * 2 and moe == [False, True, False, True]
            assert model.model.rotary_emb.rotary_dim == 4
            assert model.recurrent_state_shape()["states"]["delta"] == (4, 16, 16)
            assert model.kv_cache_shape()["num_layers"] == kinds.count(GatedAttention)
            return
        if name.startswith("lfm2"):
            conv = [isinstance(layer.mixer, ShortConv) for layer in model.model.layers]
            kernel = 3 if name == "lfm2" else 4
            assert conv == ([True, False, True, True] if name == "lfm2" else [False, True, False, True])
            assert model.recurrent_state_shape() == {"num_layers": conv.count(True), "states": {"conv": (64, kernel - 1)}}
            assert model.kv_cache_shape()["num_layers"] == conv.count(False)
            assert model.s.intermediate_size == (64 if name == "lfm2" else 96)
            return

        layers = model.model.layers
        mamba = [isinstance(layer.mixer, Mamba2Mixer) for layer in layers]
        rec = model.recurrent_state_shape()
        if name == "granitemoehybrid":
            assert mamba == [True, False, True, True] and model.model.rotary_emb is None
            assert [layer.mixer.state_idx for layer in layers if isinstance(layer.mixer, Mamba2Mixer)] == [0, 1, 2]
            assert rec == {"num_layers": 3, "states": {"conv": (128 + 2 * 2 * 8, 3), "ssm": (4, 32, 8)},
                           "float32": ("ssm",)}
        else:
            assert mamba == [False, True] and model.model.rotary_emb is not None
            assert not hasattr(layers[0], "block_sparse_moe")
        assert model.kv_cache_shape()["num_layers"] == mamba.count(False)  # only attention layers take blocks


def _service(path, **kw):
    from mistralrs.serving import ModelService, ServiceOptions

    return ModelService(ServiceOptions(model_id=str(path), dtype="f32", **kw))


def _run(svc, prompts, n=10):
    from mistralrs import protocol as P
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams

    handles = [svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=0),
                                                   max_tokens=n, ignore_eos=True)) for ids in prompts]
    return [P.collect(h)[0] for h in handles]


_ENGINE_MODELS = {"granitemoehybrid": _granite, "lfm2": _lfm2, "qwen3next": _qwen3next}


@pytest.fixture(scope="module", params=sorted(_ENGINE_MODELS))
def engine_case(request, tmp_path_factory):
    """(family, checkpoint with the tiny tokenizer, six prompts (two sharing a 40-token prefix),
    their greedy tokens with no cache at all: every step recomputed from scratch, no state carried)."""
    from mistralrs.tokenization import Tokenizer
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    path = tmp_path_factory.mktemp(f"{request.param}-engine")
    write_tiny_tokenizer(path)
    _ENGINE_MODELS[request.param](path, vocab_size=Tokenizer.from_dir(path).vocab_size, bos_token_id=0,
                                  eos_token_id=1)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 300, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(2, 300, (5,), generator=gen).tolist() for _ in range(2)]
    prompts += [torch.randint(2, 300, (int(n),), generator=gen).tolist() for n in (3, 17, 29, 1)]
    svc = _service(path, no_kv_cache=True)
    try:
        return request.param, path, prompts, [r.choices[0].token_ids for r in _run(svc, prompts)]
    finally:
        svc.shutdown()


@pytest.mark.parametrize("backend", ["paged", "sdpa"])
def test_engine_state_slots_chunked_prefill_and_mixed_batches(engine_case, backend):
    """Through the engine: prefill chunks of 7 tokens (the state carried across chunks in the
    slot), decode steps batched with other sequences' prefill chunks, every request alone or
    beside the others gives the no-cache tokens; the shared prefix is not served from the prefix
    cache (off for recurrent models), and every slot is free again afterwards."""
    _, path, prompts, want = engine_case
    svc = _service(path, attention_backend=backend, pa_blk_size=8, max_seqs=4, max_num_batched_tokens=7)
    try:
        states = svc.backend.states
        assert states is not None and states.num_slots == 4
        assert not svc.engine.scheduler.pool.enabled
        got = _run(svc, prompts)
        assert [r.choices[0].token_ids for r in got] == want
        assert all(r.usage.cached_tokens == 0 for r in got)
        assert svc.engine.scheduler.state_slots.num_free() == 4
        assert svc.engine.kv_blocks()[0] == 0
    finally:
        svc.shutdown()


def test_engine_preemption_restarts_the_state(engine_case):
    """With too few KV blocks for every sequence, preempted sequences give back their state slot
    and start again from a zero state when re-admitted: the tokens do not change."""
    _, path, prompts, want = engine_case
    svc = _service(path, pa_blk_size=8, pa_context_len=72, max_seqs=6)
    try:
        got = _run(svc, prompts)
        assert svc.engine.scheduler.preemptions > 0
        assert [r.choices[0].token_ids for r in got] == want
        assert svc.engine.scheduler.state_slots.num_free() == 6
    finally:
        svc.shutdown()


def test_qwen3next_prompt_over_one_delta_chunk(tmp_path):
    """An 80-token prompt spans two of the delta rule's 64-token chunks (the state carried from one
    to the next inside the chunked form): logits within 1e-4 of transformers'."""
    from tests.helpers.parity import assert_logits_match

    path, hf = _qwen3next(tmp_path, max_position_embeddings=256)
    assert assert_logits_match(path, hf, seq_len=80) <= 1e-4


def test_qwen3next_gguf_with_mtp_layer_from_llama_cpp(tmp_path):
    """A Qwen3-Next checkpoint with its multi-token-prediction head (``mtp.*``) through llama.cpp's
    own converter: the file's extra block (``blk.4``: attn_norm, nextn.eh_proj ...) is left out
    and the F32 file gives transformers' logits. Needs ``LLAMA_CPP_SRC``."""
    from safetensors.torch import load_file, save_file

    from mistralrs.gguf.reader import GgufModel
    from tests.helpers.gguf_writer import convert_with_llama_cpp, llama_cpp_src
    from tests.helpers.parity import assert_gguf_logits_match_hf
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    if llama_cpp_src() is None:
        pytest.skip("set LLAMA_CPP_SRC to a llama.cpp source tree to run its converter")
    path, hf = _qwen3next(tmp_path / "q3n")
    (shard,) = path.glob("*.safetensors")
    tensors = load_file(shard)
    h = hf.config.hidden_size
    gen = torch.Generator().manual_seed(9)
    tensors.update({"mtp.fc.weight": torch.randn(h, 2 * h, generator=gen),
                    "mtp.pre_fc_norm_embedding.weight": torch.zeros(h), "mtp.pre_fc_norm_hidden.weight": torch.zeros(h),
                    "mtp.norm.weight": torch.zeros(h), "mtp.layers.0.input_layernorm.weight": torch.zeros(h)})
    save_file(tensors, shard, metadata={"format": "pt"})
    write_tiny_tokenizer(path, vocab_size=hf.config.vocab_size)
    out = convert_with_llama_cpp(path, tmp_path / "q3n.gguf")
    gguf = GgufModel.open([out])
    try:
        assert "blk.4.nextn.eh_proj.weight" in gguf.tensors and "blk.4.attn_norm.weight" in gguf.tensors
    finally:
        gguf.close()
    print("vs transformers", assert_gguf_logits_match_hf(out, hf))


@pytest.mark.parametrize("name", ["granitemoehybrid", "qwen3next"])
def test_gguf_rows_joined_from_two_tensors_stay_quantized(name, tmp_path):
    """Granite's shared input_linear (ffn_gate_shexp + ffn_up_shexp) and Qwen3-Next's in_proj_qkvz
    (attn_qkv + attn_gate, regrouped) are joined from two Q8_0 tensors as block rows: the layer
    keeps Q8_0 and holds exactly the blocks --isq q8_0 makes of the checkpoint's weight."""
    from mistralrs.gguf.loading import load_gguf
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan
    from tests.helpers.gguf_writer import write_gguf

    path, _ = CASES[name](tmp_path / name)
    loaded = load_gguf(write_gguf(path, tmp_path / "q8.gguf", outtype="q8_0"), dtype=torch.float32)
    isq = load_model(path, dtype=torch.float32, quant_method_for=IsqPlan("q8_0").method_for)
    suffix = "shared_mlp.input_linear" if name.startswith("granite") else "linear_attn.in_proj_qkvz"
    theirs = dict(isq.model.named_modules())
    joined = [(n, m) for n, m in loaded.model.named_modules() if n.endswith(suffix)]
    assert joined
    for n, module in joined:
        assert module.quant_method.describe() == "q8_0", n
        assert torch.equal(module.qweight, theirs[n].qweight), n
    loaded.gguf.close()
