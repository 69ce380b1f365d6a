"""A request's web-search options: Chat Completions' ``web_search_options`` and the Responses
API's ``{"type": "web_search" | "web_search_preview", ...}`` tool, validated as mistral.rs
validates them, and the token budget of the results they ask for."""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from mistralrs.errors import InvalidRequest
from mistralrs.web_search.results import normalize_domain

# Tokens of result text handed to the model per search (mistral.rs's budgets).
TOKEN_BUDGETS = {"low": 4096, "medium": 8192, "high": 16384}
MAX_DOMAINS = 100


@attrs.frozen(kw_only=True)
class WebSearchOptions:
    search_context_size: str = "medium"
    allowed_domains: tuple[str, ...] = ()
    blocked_domains: tuple[str, ...] = ()
    unlimited: bool = False  # return_token_budget "unlimited" (Responses)
    user_location: str | None = None
    search_description: str | None = None
    extract_description: str | None = None

    @property
    def token_budget(self) -> int:
        return TOKEN_BUDGETS["high"] if self.unlimited else TOKEN_BUDGETS[self.search_context_size]


def _domains(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(d, str) and d.strip() for d in value):
        raise InvalidRequest(f"{param} must be a list of domain names", param)
    if len(value) > MAX_DOMAINS:
        raise InvalidRequest(f"{param} lists {len(value)} domains; at most {MAX_DOMAINS} are allowed", param)
    return tuple(dict.fromkeys(normalize_domain(d) for d in value))


def _location(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        approx = value.get("approximate", value)
        parts = [str(approx[k]) for k in ("city", "region", "country") if isinstance(approx, Mapping) and approx.get(k)]
        return ", ".join(parts) or None
    raise InvalidRequest("user_location must be an object", "web_search_options.user_location")


def parse_web_search_options(value: Any, *, param: str = "web_search_options") -> WebSearchOptions:
    """Validated options; a Responses tool keeps its ``type`` (``web_search_preview`` ignores
    ``external_web_access: false``, as mistral.rs does)."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{param} must be an object", param)
    size = value.get("search_context_size") or "medium"
    if size not in TOKEN_BUDGETS:
        raise InvalidRequest(f"{param}.search_context_size must be low, medium or high, not {size!r}",
                             f"{param}.search_context_size")
    filters = value.get("filters")
    if filters is not None and not isinstance(filters, Mapping):
        raise InvalidRequest(f"{param}.filters must be an object", f"{param}.filters")
    filters = filters or {}
    budget = value.get("return_token_budget")
    if budget not in (None, "default", "unlimited"):
        raise InvalidRequest(f"{param}.return_token_budget must be default or unlimited", f"{param}.return_token_budget")
    kinds = value.get("search_content_types")
    if kinds is not None and kinds != ["text"]:
        raise InvalidRequest(f"{param}.search_content_types: only [\"text\"] is supported (no image search)",
                             f"{param}.search_content_types")
    if value.get("external_web_access") is False and value.get("type") != "web_search_preview":
        raise InvalidRequest(f"{param}.external_web_access false is not supported: web search reaches the web",
                             f"{param}.external_web_access")
    for key in ("search_description", "extract_description"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise InvalidRequest(f"{param}.{key} must be a string", f"{param}.{key}")
    return WebSearchOptions(
        search_context_size=size,
        allowed_domains=_domains(filters.get("allowed_domains"), f"{param}.filters.allowed_domains"),
        blocked_domains=_domains(filters.get("blocked_domains"), f"{param}.filters.blocked_domains"),
        unlimited=budget == "unlimited",
        user_location=_location(value.get("user_location")),
        search_description=value.get("search_description"),
        extract_description=value.get("extract_description"),
    )
