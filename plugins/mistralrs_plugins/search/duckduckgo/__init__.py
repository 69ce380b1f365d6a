"""DuckDuckGo's HTML endpoint as the web-search backend (mistral.rs's default). Registration
only: the backend lives in `.backend`. ``MISTRALRS_SEARCH_URL`` points it at another endpoint
of the same shape (tests use a local one)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import SearchBackendSpec


@hookimpl
def register_search_backends(register):
    register(SearchBackendSpec(
        name="duckduckgo",
        factory="mistralrs_plugins.search.duckduckgo.backend:DuckDuckGo",
        description="DuckDuckGo HTML results (html.duckduckgo.com), the pages' text fetched concurrently",
    ))
