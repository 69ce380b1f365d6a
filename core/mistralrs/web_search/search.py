"""`WebSearch`: the server's search (a backend plugin, or a Python callback; an optional
embedding model for reranking; the chat model's tokenizer for the budget) and, per request,
the two tools mistral.rs offers the model — ``mistralrs_search_the_web`` ({query}) and
``mistralrs_website_content_extractor`` ({url}) — with their calls bound to that request's
options. Results go back to the model as mistral.rs's JSON: ``{"sources": [...], "output":
[{title, description, url, content}]}``."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from mistralrs.errors import ConfigError
from mistralrs.web_search.options import WebSearchOptions
from mistralrs.web_search.rerank import rerank
from mistralrs.web_search.results import SearchResult, filter_results, source_domain, source_domains

log = logging.getLogger("mistralrs.search")

SEARCH_TOOL = "mistralrs_search_the_web"
EXTRACT_TOOL = "mistralrs_website_content_extractor"
MAX_RESULTS = 10
SEARCH_DESCRIPTION = """This tool is used to search the web given a query.
If the user wants up-to-date information or you want to retrieve new information, call this tool.
If you call this tool, then you MUST complete your answer using the output.
The input can be a query. It should not be a URL. Either is fine.
Additionally, if you have any questions that require a follow-up, you can call this tool repeatedly.

You should expect output like this:
{"sources": ["example.com", ...], "output": [{"title": "...", "description": "...", "url": "...", "content": "..."}, ...]}
"""
EXTRACT_DESCRIPTION = """This tool is used to extract the content of a website.
If the user wants information about a specific site or you want to extract the content of a specific site, call this tool.
The input must be a URL.
Additionally, if you have any questions that require a follow-up, you can call this tool repeatedly.

You should expect output like this:
{"output": [{"url": "...", "content": "..."}]}
"""


def _tool(name: str, description: str, field: str, about: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description, "strict": True,
        # minLength: the grammar of a strict call never lets the model send an empty query or URL
        "parameters": {"type": "object", "properties": {field: {"type": "string", "description": about, "minLength": 1}},
                       "required": [field], "additionalProperties": False}}}


class CallbackBackend:
    """A Python `search_callback(query) -> [{title, description, url, content}]` as a backend."""

    def __init__(self, callback: Callable[[str], Any]) -> None:
        self.callback = callback

    def search(self, query: str, max_results: int = MAX_RESULTS) -> list[SearchResult]:
        found = self.callback(query) or []
        return [SearchResult(str(r.get("title", "")), str(r.get("description", "")), str(r.get("url", "")),
                             str(r.get("content", ""))) for r in list(found)[:max_results]]

    def extract(self, url: str) -> str:
        raise ConfigError("the search callback cannot extract pages")


def backend_from_registry(registry: Any, name: str | None = None) -> Any:
    """The named search backend (`--search-backend`), else the highest-priority one."""
    from mistralrs.specs import resolve

    catalogue = registry.search_backends
    if name:
        if name not in catalogue.names():
            raise ConfigError(f"--search-backend: no search backend named {name!r}; available: "
                              f"{', '.join(catalogue.names()) or 'none'}")
        return resolve(catalogue.get(name).factory)()
    specs = sorted(catalogue, key=lambda s: (-s.priority, s.name))
    if not specs:
        raise ConfigError("web search needs a search backend plugin, and none is installed (`mistralrs plugins`)")
    return resolve(specs[0].factory)()


# The reranker names mistral.rs's --search-embedding-model accepts, and what they are.
EMBEDDING_MODEL_ALIASES = {"embedding-gemma": "google/embeddinggemma-300m", "embeddinggemma": "google/embeddinggemma-300m"}


class WebSearch:
    """Server-wide: `backend` (search/extract) and `reranker` (an EmbeddingService or None).
    `load_reranker` loads one (``--search-embedding-model``: ``embedding-gemma`` or any
    embedding model id or directory)."""

    def __init__(self, backend: Any, *, reranker: Any = None) -> None:
        self.backend = backend
        self.reranker = reranker

    def for_request(self, options: WebSearchOptions, tokenizer: Any = None) -> BoundSearch:
        """The tools of one request; `tokenizer` (the chat model's) measures the token budget."""
        return BoundSearch(self, options, tokenizer)

    def load_reranker(self, model: str, **options: Any) -> None:
        from mistralrs.embedding.service import EmbeddingService
        from mistralrs.serving import ServiceOptions

        model_id = EMBEDDING_MODEL_ALIASES.get(model.lower(), model)
        self.reranker = EmbeddingService(ServiceOptions(model_id=model_id, kind="embedding", **options))
        log.info("web search reranks results with %s", model_id)

    def shutdown(self) -> None:
        if self.reranker is not None:
            self.reranker.shutdown()

    def embed(self, queries: list[str], documents: list[str]) -> tuple[Any, Any]:
        from mistralrs.embedding.requests import EmbeddingJob

        svc = self.reranker
        prompts = svc.pipeline.prompts

        def run(texts: list[str], prompt: str) -> Any:
            name = prompt if prompt in prompts else None
            return svc.embed(EmbeddingJob(texts=tuple(texts), prompt_name=name))[0]

        return run(queries, "query"), run(documents, "document")


class BoundSearch:
    """The search tools of one request, bound to its options."""

    def __init__(self, search: WebSearch, options: WebSearchOptions, tokenizer: Any = None) -> None:
        self.search = search
        self.options = options
        self.tokenizer = tokenizer

    def fit(self, text: str, tokens: int) -> tuple[str, int]:
        """`text` cut to at most `tokens` tokens of the chat model (about 4 characters each
        without a tokenizer); returns (text, tokens used)."""
        if tokens <= 0:
            return "", 0
        if self.tokenizer is None:
            cut = text[:tokens * 4]
            return cut, -(-len(cut) // 4)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= tokens:
            return text, len(ids)
        return self.tokenizer.decode(ids[:tokens]), tokens

    @property
    def tools(self) -> list[dict[str, Any]]:
        o = self.options
        where = f"\nThe user is located in {o.user_location}." if o.user_location else ""
        return [_tool(SEARCH_TOOL, (o.search_description or SEARCH_DESCRIPTION) + where, "query",
                      "A query for web searching."),
                _tool(EXTRACT_TOOL, o.extract_description or EXTRACT_DESCRIPTION, "url",
                      "A URL to extract the content of the website from.")]

    @property
    def callbacks(self) -> dict[str, Callable[[str, dict[str, Any]], str]]:
        return {SEARCH_TOOL: self._search, EXTRACT_TOOL: self._extract}

    def _search(self, _name: str, args: dict[str, Any]) -> str:
        query = args.get("query")
        if not isinstance(query, str) or not query.strip():
            return json.dumps({"error": "the search needs a non-empty \"query\" string"})
        query = query.strip().strip('"')
        o, s = self.options, self.search
        if query.startswith(("http://", "https://")):  # a URL: fetch it rather than search for it
            results = [SearchResult(query, "", query, s.backend.extract(query))]
        else:
            results = s.backend.search(query, MAX_RESULTS)
        results = filter_results(results, o.allowed_domains, o.blocked_domains)
        if s.reranker is not None and results:
            results = rerank(query, results, s.embed, self.fit, o.token_budget)
        else:
            share = o.token_budget // max(len(results), 1)
            for r in results:
                r.content = self.fit(r.content, share)[0]
        log.info("web search %r: %d results from %s", query, len(results), ", ".join(source_domains(results)))
        return json.dumps({"sources": source_domains(results), "output": [r.to_json() for r in results]},
                          ensure_ascii=False)

    def _extract(self, _name: str, args: dict[str, Any]) -> str:
        url = args.get("url")
        if not isinstance(url, str) or not url.strip().startswith(("http://", "https://")):
            return json.dumps({"error": "the extractor needs an http(s) \"url\""})
        url = url.strip()
        domain = source_domain(url)
        if domain is None or not filter_results([SearchResult("", "", url)], self.options.allowed_domains,
                                                self.options.blocked_domains):
            return json.dumps({"error": f"{domain or url} is outside this request's domain filters"})
        try:
            content = self.search.backend.extract(url)
        except Exception as exc:  # noqa: BLE001 - the model sees the failure
            content = f"ERROR: failed to extract content ({type(exc).__name__}: {exc})"
        content = self.fit(content, self.options.token_budget)[0]
        return json.dumps({"output": [{"url": url, "content": content}]}, ensure_ascii=False)
