"""Web search as server-side tools (docs/web-search.md): `options` (a request's
``web_search_options`` / Responses ``web_search`` tool, validated), `results` (what backends
return, domain filters), `html_text` (page text), `rerank` (BM25 prefilter and embedding
reranking), `search` (`WebSearch`: the tools offered to the model and their calls)."""
