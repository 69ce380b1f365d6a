"""Parity of gpt_oss with transformers, attention sinks in the backend contract, and GPT-OSS's
MXFP4 checkpoint layout.

Cases (tiny, 4 experts top-2, hidden 64, intermediate 64 so MXFP4 blocks of 32 fit):
gpt_oss - layer_types sliding (window 8, shorter than the sequences) then full, yarn rope
  (factor 8, truncate false), q/k/v/o biases, sinks, biased router and experts, clamped SwiGLU;
gpt_oss_full_tied - every layer full attention, default rope, tied embeddings, top-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.parity import ParitySuite, make_tiny_hf_model, our_logits, tiny_fixture

transformers = pytest.importorskip("transformers")


def _oss(p, **kw):
    kw = {"intermediate_size": 64, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
          "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
          "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 150000.0},
          **kw}
    return make_tiny_hf_model(transformers.GptOssConfig, transformers.GptOssForCausalLM, p, **kw)


CASES = {
    "gpt_oss": lambda p: _oss(p),
    "gpt_oss_full_tied": lambda p: _oss(p, layer_types=["full_attention"] * 2, num_experts_per_tok=3,
                                        tie_word_embeddings=True, seed=1,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

tiny = tiny_fixture(CASES)


class TestParity(ParitySuite):
    expected_arch = {name: "gpt_oss" for name in CASES}
    tied = frozenset({"gpt_oss_full_tied"})
    # llama.cpp's gpt-oss graph slides every other layer whatever the config says
    gguf_config = {"gpt_oss_full_tied": {"layer_types": ["sliding_attention", "full_attention"]}}
    # top-2 of 4 experts on logits the Q8_0 token table and projections shift: a few routing flips
    gguf_q8_min_cosine = {"gpt_oss": 0.98}

    def bf16_close(self, name, path, hf):
        from transformers.models.gpt_oss import modeling_gpt_oss

        from tests.parity.test_moe_glm_family import assert_moe_bf16_close

        # the helper finds transformers' routers as ``mlp.gate``; GPT-OSS names it ``mlp.router``
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(modeling_gpt_oss.GptOssMLP, "gate", property(lambda self: self.router), raising=False)
            return assert_moe_bf16_close(path, hf)

    def check_layout(self, name, path, model):
        from mistralrs_plugins.models.gpt_oss.model import GptOssMoE

        layers = model.model.layers
        assert all(type(layer.ffn) is GptOssMoE for layer in layers)
        assert all(layer.self_attn.sinks is not None for layer in layers)
        windows = [layer.self_attn.sliding_window for layer in layers]
        assert windows == ([8, None] if name == "gpt_oss" else [None, None])

    def test_paged_decode_kernel_with_sinks(self, tiny):
        """The paged backend's batched decode (the reference kernel: sinks bypass the native one)
        gives the reference backend's greedy tokens."""
        from mistralrs.loading import build_attention_backend, generate_greedy, load_model

        _, path, hf = tiny
        loaded = load_model(path, dtype=torch.float32)
        prompt = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(4)).tolist()
        got = [generate_greedy(loaded, build_attention_backend(loaded, name=b, num_blocks=8, block_size=8), prompt, 16)
               for b in ("paged", "sdpa")]
        assert got[0] == got[1]


def _attention_with_sinks_reference(q, k, v, sinks, scale, window=None):
    """Eager attention with sinks as transformers' GPT-OSS computes it (one sequence, causal)."""
    hq, hk = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(hq // hk, 0), v.transpose(0, 1).repeat_interleave(hq // hk, 0)
    scores = qh @ kh.transpose(-1, -2) * scale
    n = q.shape[0]
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    logits = torch.cat([scores, sinks.view(-1, 1, 1).expand(-1, n, 1)], dim=-1)
    probs = torch.softmax(logits - logits.max(-1, keepdim=True).values, dim=-1)[..., :-1]
    return (probs @ vh).transpose(0, 1)


@pytest.mark.parametrize("backend_name", ["sdpa", "paged"])
@pytest.mark.parametrize("window", [None, 5])
def test_backends_attend_with_sinks_as_the_reference(backend_name, window):
    """`attend(sinks=)` on each backend, prefill and cached decode, equals the eager formula."""
    from mistralrs.attention import KVCacheShape
    from mistralrs.plugins import get_registry
    from mistralrs.specs import resolve

    g = torch.Generator().manual_seed(0)
    n, hq, hk, d = 11, 4, 2, 16
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hk, hk))
    sinks = torch.randn(hq, generator=g)
    want = _attention_with_sinks_reference(q, k, v, sinks, 0.25, window)
    cls = resolve(get_registry().attention_backends.get(backend_name).backend)
    backend = cls(KVCacheShape(num_layers=1, num_kv_heads=hk, head_dim=d, num_blocks=4, block_size=4,
                               dtype=torch.float32))
    tables = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)
    slots = torch.tensor([int(tables[0, p // 4]) * 4 + p % 4 for p in range(n)])
    pre = n - 2
    b = backend.batch([0, pre], [pre], slot_mapping=slots[:pre], block_tables=tables)
    out = [backend.attend(0, q[:pre], k[:pre], v[:pre], b, scale=0.25, sliding_window=window, sinks=sinks)]
    for p in range(pre, n):  # decode steps: the paged backend's kernel path
        b = backend.batch([0, 1], [p + 1], slot_mapping=slots[p:p + 1], block_tables=tables)
        out.append(backend.attend(0, q[p:p + 1], k[p:p + 1], v[p:p + 1], b, scale=0.25, sliding_window=window,
                                  sinks=sinks))
    torch.testing.assert_close(torch.cat(out), want, atol=1e-5, rtol=1e-5)
    without = backend.attend(0, q[:1], k[:1], v[:1], backend.batch([0, 1], [1]), scale=0.25)
    torch.testing.assert_close(without, v[:1].repeat_interleave(hq // hk, 1))  # one key, no sink: its value


def mxfp4_checkpoint(tmp_path):
    """The `_oss` checkpoint with its experts packed as GPT-OSS publishes them (``gate_up_proj_blocks``
    [E, 2I, H / 32, 16] with interleaved gate/up rows, ``down_proj_blocks``, their e8m0 ``_scales``;
    float biases, router and attention), and a float copy holding transformers' dequantization of
    those blocks. Returns (mxfp4 dir, dequantized dir)."""
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tests.helpers.packed_checkpoints import pack_mxfp4

    path, hf = _oss(tmp_path / "float")
    tensors = load_file(str(path / "model.safetensors"))
    packed, deq = dict(tensors), dict(tensors)
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = np.ascontiguousarray(tensors[name].transpose(0, 2, 1))  # [E, out, in], rows as stored
            blocks, scales = pack_mxfp4(w)
            del packed[name]
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
            # transformers' dequantizer returns the transposed [E, in, out] float layout
            deq[name] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                   dtype=torch.float32).numpy()
            assert deq[name].shape == tensors[name].shape
    mx, ref_dir = tmp_path / "mxfp4", tmp_path / "dequantized"
    for d, ts in ((mx, packed), (ref_dir, deq)):
        d.mkdir()
        save_file(ts, str(d / "model.safetensors"))
        config = json.loads((path / "config.json").read_text())
        if d == mx:
            config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        (d / "config.json").write_text(json.dumps(config))
    return mx, ref_dir


def test_mxfp4_checkpoint_in_gpt_oss_layout_loads(tmp_path):
    """A GPT-OSS checkpoint whose experts are MXFP4 as published loads through the
    `mxfp4_checkpoint` format and gives transformers' logits for the same (dequantized) weights."""
    from mistralrs.loading import load_model

    mx, ref_dir = mxfp4_checkpoint(tmp_path)
    loaded = load_model(mx, dtype=torch.float32)
    experts = loaded.model.model.layers[0].ffn.expert_list[0]
    assert "mxfp4" in experts.gate_proj.quant_method.describe()
    assert experts.gate_proj.bias is not None
    ref = transformers.GptOssForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    torch.testing.assert_close(our_logits(loaded, ids), want, atol=1e-4, rtol=1e-4)


def assert_mxfp4_gguf_matches(mx, gguf_path, *, logits: bool = True):
    """The GGUF file of an MXFP4 checkpoint keeps the experts' MXFP4 blocks (ggml's layout): the same
    expert weights as the checkpoint loaded from safetensors, and (`logits`: a file with the other
    weights in F32) the same logits."""
    import gguf as gguf_py

    from mistralrs.gguf.loading import load_gguf
    from mistralrs.loading import load_model

    types = {t.name: t.tensor_type for t in gguf_py.GGUFReader(gguf_path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == gguf_py.GGMLQuantizationType.MXFP4, types
    assert types["blk.0.ffn_down_exps.weight"] == gguf_py.GGMLQuantizationType.MXFP4
    ref, got = load_model(mx, dtype=torch.float32), load_gguf(gguf_path, dtype=torch.float32)
    for layer in (0, 1):
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                a = getattr(ref.model.model.layers[layer].ffn.expert_list[e], proj)
                b = getattr(got.model.model.layers[layer].ffn.expert_list[e], proj)
                assert "mxfp4" in b.quant_method.describe().lower(), b.quant_method.describe()
                assert torch.equal(a.quant_method.dequantize(a), b.quant_method.dequantize(b)), (layer, e, proj)
                assert torch.equal(a.bias, b.bias)
    if logits:
        ids = torch.randint(0, 320, (16,), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(our_logits(got, ids), our_logits(ref, ids), atol=1e-5, rtol=1e-5)
    got.gguf.close()


def test_mxfp4_checkpoint_as_gguf(tmp_path):
    """llama.cpp's converter writes a GPT-OSS MXFP4 checkpoint's experts as MXFP4 blocks (the F32
    file: everything else F32); that file loads into the same experts."""
    from tests.helpers.gguf_writer import write_gguf

    mx, _ = mxfp4_checkpoint(tmp_path)
    assert_mxfp4_gguf_matches(mx, write_gguf(mx, tmp_path / "mxfp4.gguf", outtype="f32"))
