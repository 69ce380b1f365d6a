"""Web search, the fast parts: options as mistral.rs validates them, domain filters, page text,
BM25, the DuckDuckGo backend against a local fake of its HTML endpoint, and the tools' JSON
within the token budget."""

from __future__ import annotations

import json

import pytest

from mistralrs.errors import InvalidRequest
from mistralrs.web_search.html_text import html_to_text
from mistralrs.web_search.options import parse_web_search_options
from mistralrs.web_search.rerank import bm25_scores
from mistralrs.web_search.results import SearchResult, filter_results, source_domain
from tests.helpers.fake_search import PAGES, FakeSearch


@pytest.fixture(scope="module")
def fake():
    srv = FakeSearch().start()
    yield srv
    srv.stop()


@pytest.fixture()
def ddg(fake):
    from mistralrs_plugins.search.duckduckgo.backend import DuckDuckGo

    return DuckDuckGo(fake.search_url)


def test_options_defaults_and_budgets():
    assert parse_web_search_options({}).token_budget == 8192
    assert parse_web_search_options({"search_context_size": "low"}).token_budget == 4096
    assert parse_web_search_options({"return_token_budget": "unlimited", "search_context_size": "low"}).token_budget == 16384
    o = parse_web_search_options({"filters": {"allowed_domains": ["WWW.Example.com."], "blocked_domains": ["b.org"]},
                                  "user_location": {"type": "approximate", "approximate": {"city": "Lyon",
                                                                                           "country": "FR"}}})
    assert o.allowed_domains == ("example.com",) and o.blocked_domains == ("b.org",) and o.user_location == "Lyon, FR"


@pytest.mark.parametrize("value, param", [
    ([], "web_search_options"),
    ({"search_context_size": "huge"}, "web_search_options.search_context_size"),
    ({"filters": {"allowed_domains": ["x.com"] * 101}}, "web_search_options.filters.allowed_domains"),
    ({"filters": {"blocked_domains": "x.com"}}, "web_search_options.filters.blocked_domains"),
    ({"search_content_types": ["image"]}, "web_search_options.search_content_types"),
    ({"external_web_access": False}, "web_search_options.external_web_access"),
    ({"return_token_budget": "lots"}, "web_search_options.return_token_budget"),
])
def test_bad_options_name_the_field(value, param):
    with pytest.raises(InvalidRequest) as err:
        parse_web_search_options(value)
    assert err.value.param == param


def test_preview_tool_ignores_external_web_access():
    assert parse_web_search_options({"type": "web_search_preview", "external_web_access": False})


def test_domain_filters_match_subdomains():
    results = [SearchResult("a", "", "https://docs.python.org/x"), SearchResult("b", "", "https://www.python.org/"),
               SearchResult("c", "", "https://notpython.org/"), SearchResult("d", "", "not a url")]
    assert [r.title for r in filter_results(results, allowed=("python.org",))] == ["a", "b"]
    assert [r.title for r in filter_results(results, blocked=("docs.python.org",))] == ["b", "c"]
    assert source_domain("https://WWW.Example.COM:8080/a") == "example.com"


def test_html_to_text_drops_page_furniture():
    text = html_to_text("<html><head><title>T</title><script>x=1</script></head><body><nav>menu</nav>"
                        "<p>Hello&nbsp;<b>world</b> &amp; more</p><div>Next   line</div><footer>f</footer></body>")
    assert text == "Hello world & more\nNext line"


def test_bm25_prefers_the_matching_document():
    docs = ["the cat sat on the mat", "dogs and cats", "stock market news today", "the the the"]
    scores = bm25_scores("cat mat", docs)
    assert scores.index(max(scores)) == 0 and scores[2] == 0.0 and scores[3] == 0.0


def test_duckduckgo_backend_against_the_fake(fake, ddg):
    results = ddg.search("capital of france", 10)
    assert fake.queries[-1] == "capital of france"
    assert [r.url for r in results] == [fake.url_of(n) for n in ("paris", "bananas", "rust")]  # broken dropped
    paris = results[0]
    assert paris.title == PAGES["paris"][1] and paris.description == PAGES["paris"][2]
    assert "Eiffel Tower" in paris.content and "tracking" not in paris.content and "Home | About" not in paris.content
    assert "Rust guarantees" in ddg.extract(fake.url_of("rust"))
    assert len(ddg.search("x", 2)) == 2


def test_search_tool_output_and_budget(fake, ddg):
    from mistralrs.web_search.search import EXTRACT_TOOL, SEARCH_TOOL, WebSearch

    search = WebSearch(ddg)
    bound = search.for_request(parse_web_search_options({"search_context_size": "low",
                                                         "filters": {"blocked_domains": ["localhost"]}}))
    names = [t["function"]["name"] for t in bound.tools]
    assert names == [SEARCH_TOOL, EXTRACT_TOOL] and all(t["function"]["strict"] for t in bound.tools)
    out = json.loads(bound.callbacks[SEARCH_TOOL](SEARCH_TOOL, {"query": "paris"}))
    assert out["sources"] == ["127.0.0.1"]
    assert [o["title"] for o in out["output"]] == [PAGES["paris"][1], PAGES["rust"][1]]  # localhost blocked
    assert all(len(o["content"]) <= 4096 // 2 * 4 for o in out["output"])
    assert json.loads(bound.callbacks[SEARCH_TOOL](SEARCH_TOOL, {"query": " "}))["error"]
    blocked = json.loads(bound.callbacks[EXTRACT_TOOL](EXTRACT_TOOL, {"url": fake.url_of("bananas")}))
    assert "outside" in blocked["error"]
    page = json.loads(bound.callbacks[EXTRACT_TOOL](EXTRACT_TOOL, {"url": fake.url_of("paris")}))
    assert "Eiffel Tower" in page["output"][0]["content"]


def test_budget_counts_the_chat_models_tokens(fake, ddg, tmp_path):
    from mistralrs.tokenization import Tokenizer
    from mistralrs.web_search.search import SEARCH_TOOL, WebSearch
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    tok = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "tok"))
    bound = WebSearch(ddg).for_request(parse_web_search_options({"search_context_size": "low"}), tok)
    out = json.loads(bound.callbacks[SEARCH_TOOL](SEARCH_TOOL, {"query": "paris"}))
    share = 4096 // 3
    assert all(len(tok.encode(o["content"], add_special_tokens=False)) <= share + 2 for o in out["output"])


def test_callback_backend():
    from mistralrs.web_search.search import SEARCH_TOOL, CallbackBackend, WebSearch

    bound = WebSearch(CallbackBackend(lambda q: [{"title": q, "description": "d", "url": "internal://kb/1",
                                                  "content": "c"}])).for_request(parse_web_search_options({}))
    out = json.loads(bound.callbacks[SEARCH_TOOL](SEARCH_TOOL, {"query": "kb"}))
    assert out["output"] == [{"title": "kb", "description": "d", "url": "internal://kb/1", "content": "c"}]
