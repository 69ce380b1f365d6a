"""Embeddings, the fast parts: request validation, the sentence-transformers pipeline config,
architecture selection by kind, the padded no-cache attention path, the engine's batching and
failure isolation, and the hub fetch of a sentence-transformers repository (offline cache)."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch

from mistralrs.embedding.pipeline import load_pipeline
from mistralrs.embedding.requests import embedding_response, parse_embedding_request
from mistralrs.errors import InvalidRequest, ModelLoadError


# -- requests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, texts, ids", [
    ("hi", ("hi",), None),
    (["a", "b"], ("a", "b"), None),
    ([1, 2, 3], None, ((1, 2, 3),)),
    ([[1], [2, 3]], None, ((1,), (2, 3))),
])
def test_input_forms(value, texts, ids):
    job = parse_embedding_request({"input": value})
    assert job.texts == texts and job.token_ids == ids


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": [-1]}, "input"),
    ({"input": [True]}, "input"),
    ({"input": {"a": 1}}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": "8"}, "dimensions"),
    ({"input": "a", "truncate_sequence": "yes"}, "truncate_sequence"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequest) as err:
        parse_embedding_request(body)
    assert err.value.param == param


def test_base64_is_little_endian_float32():
    job = parse_embedding_request({"input": ["a", "b"], "encoding_format": "base64"})
    vectors = torch.tensor([[1.0, -2.5], [0.25, 3.0]])
    out = embedding_response(job, vectors, 7, "m")
    raw = base64.b64decode(out["data"][1]["embedding"])
    assert struct.unpack("<2f", raw) == (0.25, 3.0)
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in out["data"]] == [0, 1] and out["object"] == "list"


# -- the sentence-transformers pipeline ----------------------------------------------------------
def _folder(tmp_path, modules, pooling=None, **files):
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


TRANSFORMER = {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}


def test_legacy_pooling_keys_and_max_len(tmp_path):
    root = _folder(tmp_path, [TRANSFORMER, POOLING],
                   {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True},
                   sentence_bert_config_json=None)
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 77}))
    pipe = load_pipeline(root, {"max_position_embeddings": 512}, hidden_size=8)
    assert pipe.pooling == ("cls", "max") and pipe.dimension == 16 and pipe.max_seq_length == 77


def test_plain_model_gets_mean_pooling(tmp_path):
    pipe = load_pipeline(tmp_path, {"max_position_embeddings": 128}, hidden_size=8)
    assert pipe.pooling == ("mean",) and not pipe.normalize and pipe.max_seq_length == 128


@pytest.mark.parametrize("modules, pooling, message", [
    ([TRANSFORMER, POOLING], {"pooling_mode": "median"}, "pooling mode 'median'"),
    ([TRANSFORMER], None, "no Pooling module"),
    ([TRANSFORMER, POOLING, {"idx": 2, "path": "", "type": "sentence_transformers.models.LSTM"}], {}, "LSTM"),
    ({"not": "a list"}, None, "list of modules"),
])
def test_bad_pipelines_are_one_line_errors(tmp_path, modules, pooling, message):
    root = _folder(tmp_path, modules, pooling)
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(root, {}, hidden_size=8)


def test_pooling_modes_skip_prompt_tokens():
    from mistralrs.embedding.pipeline import SentencePipeline

    hidden = torch.arange(10, dtype=torch.float32).repeat_interleave(2).view(10, 2)  # rows 0..9
    lengths = [4, 6]
    for mode, want in [("cls", [[1, 1], [6, 6]]), ("lasttoken", [[3, 3], [9, 9]]), ("max", [[3, 3], [9, 9]]),
                       ("mean", [[2, 2], [7.5, 7.5]])]:
        pipe = SentencePipeline(max_seq_length=8, pooling=(mode,))
        assert pipe.pool(hidden, lengths, [1, 2]).tolist() == want


# -- architecture selection ----------------------------------------------------------------------
def test_kind_decides_between_qwen3_and_qwen3embedding():
    from mistralrs.loading import select_architecture

    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    assert select_architecture(cfg).name == "qwen3"
    assert select_architecture(cfg, kind="embedding").name == "qwen3embedding"
    assert select_architecture({"architectures": ["BertModel"]}).name == "bert"  # only an embedding arch serves it
    with pytest.raises(ModelLoadError, match="kind 'embedding'"):
        select_architecture({"architectures": ["LlamaForCausalLM"]}, kind="embedding")


# -- the padded no-cache attention path ---------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_padded_attention_equals_per_sequence(causal, window):
    from mistralrs.attention import KVCacheShape
    from mistralrs_plugins.attention.sdpa.backend import SdpaBackend

    backend = SdpaBackend(KVCacheShape(num_layers=1, num_kv_heads=2, head_dim=8))
    lens = [5, 1, 9]
    starts = [0, 5, 6, 15]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(15, h, 8, generator=gen) for h in (4, 2, 2))
    batch = backend.batch(starts, lens, causal=causal)
    padded = backend.attend(0, q, k, v, batch, scale=0.3, sliding_window=window)
    want = torch.empty_like(padded)
    for i in range(3):
        backend.attend_seq(i, 0, q, k, v, batch, want, cached=False, scale=0.3, sliding_window=window)
    assert torch.allclose(padded, want, atol=1e-5)
    if not causal and window is None:  # every token sees the whole sequence
        s = starts[2]
        qi, ki, vi = q[s:], k[s:].repeat_interleave(2, 1), v[s:].repeat_interleave(2, 1)
        ref = torch.softmax(torch.einsum("qhd,khd->hqk", qi, ki) * 0.3, -1)
        assert torch.allclose(padded[s:], torch.einsum("hqk,khd->qhd", ref, vi), atol=1e-5)


def test_non_causal_batches_have_no_cache():
    from mistralrs.attention import KVCacheShape
    from mistralrs_plugins.attention.sdpa.backend import SdpaBackend

    backend = SdpaBackend(KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="without a KV cache"):
        backend.batch([0, 2], [2], slot_mapping=torch.tensor([0, 1]), block_tables=torch.tensor([[0]]), causal=False)


# -- the engine ------------------------------------------------------------------------------------
class _Sum(torch.nn.Module):
    """A stand-in model: each token's hidden state is its id (so mean pooling is checkable)."""

    bidirectional = True

    def forward(self, ids, positions, batch):
        if (ids == 999).any():
            raise RuntimeError("bad token")
        return ids.float()[:, None].repeat(1, 2)


def test_engine_batches_requests_and_isolates_failures():
    from mistralrs.attention import KVCacheShape
    from mistralrs.embedding.engine import EmbeddingEngine
    from mistralrs.embedding.pipeline import SentencePipeline
    from mistralrs_plugins.attention.sdpa.backend import SdpaBackend

    backend = SdpaBackend(KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=2))
    engine = EmbeddingEngine(_Sum(), backend, SentencePipeline(max_seq_length=16), device="cpu", max_batch_tokens=4)
    try:
        futures = [engine.submit([[1, 3], [5]]), engine.submit([[999]]), engine.submit([[2, 2, 2, 2]])]
        assert futures[0].result(10).tolist() == [[2.0, 2.0], [5.0, 5.0]]
        with pytest.raises(RuntimeError, match="bad token"):
            futures[1].result(10)
        assert futures[2].result(10).tolist() == [[2.0, 2.0]]  # the engine goes on
    finally:
        engine.shutdown()


# -- the hub -------------------------------------------------------------------------------------
def test_offline_hub_snapshot_of_a_sentence_transformers_repo(tmp_path, monkeypatch):
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions
    from tests.helpers.embedding_models import write_tiny_bert
    from tests.helpers.hub_cache import hub_snapshot

    folder = write_tiny_bert(tmp_path / "src")
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    cache = tmp_path / "cache"
    hub_snapshot(cache, "org/tiny-bert", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    service = open_service(ServiceOptions(model_id="org/tiny-bert", hf_cache=str(cache), dtype="f32"))
    try:
        assert service.kind == "embedding" and service.pipeline.dense and service.pipeline.pooling == ("cls",)
    finally:
        service.shutdown()


def test_hub_fetch_lists_module_files():
    from pathlib import Path

    from mistralrs.hub import _st_module_files

    listing = {"modules.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
               "2_Dense/pytorch_model.bin", "onnx/model.onnx", "README.md"}

    class _P(type(Path())):
        def read_text(self, *a, **k):  # noqa: ARG002
            return json.dumps([{"path": ""}, {"path": "1_Pooling"}, {"path": "2_Dense"}, {"path": "3_Normalize"}])

    got = _st_module_files(_P("modules.json"), listing)
    assert got == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors", "README.md"]


def test_roberta_positions_follow_transformers():
    """Per sequence of a flat batch: non-padding tokens count from padding_idx + 1, padding
    tokens sit at padding_idx (transformers' create_position_ids_from_input_ids)."""
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

    from mistralrs_plugins.models.roberta.model import roberta_positions

    seqs = [[5, 6, 7], [8, 1, 9, 10], [11]]  # the second holds a padding id (1) mid-sequence
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    want = torch.cat([XLMRobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor([s]), 1)[0] for s in seqs])
    assert roberta_positions(ids, positions, 1).tolist() == want.tolist()
