"""What a search backend returns, and the domain rules mistral.rs applies to it."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs


@attrs.define
class SearchResult:
    title: str
    description: str
    url: str
    content: str = ""

    def to_json(self) -> dict[str, str]:
        return {"title": self.title, "description": self.description, "url": self.url, "content": self.content}


def normalize_domain(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    return domain[4:] if domain.startswith("www.") else domain


def source_domain(url: str) -> str | None:
    """The host of a result's URL, lower-case, without ``www.`` (None for a URL without one)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return normalize_domain(host) if host else None


def domain_matches(domain: str, rule: str) -> bool:
    """A rule matches its domain and every subdomain of it."""
    return domain == rule or domain.endswith("." + rule)


def filter_results(results: list[SearchResult], allowed: tuple[str, ...] = (),
                   blocked: tuple[str, ...] = ()) -> list[SearchResult]:
    """Results on the allowed domains and off the blocked ones; without filters, all of them
    (a search callback's ``internal://`` results included)."""
    if not allowed and not blocked:
        return list(results)
    out = []
    for r in results:
        domain = source_domain(r.url)
        if domain is None:
            continue
        if allowed and not any(domain_matches(domain, a) for a in allowed):
            continue
        if any(domain_matches(domain, b) for b in blocked):
            continue
        out.append(r)
    return out


def source_domains(results: list[SearchResult]) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        d = source_domain(r.url)
        if d:
            seen.setdefault(d)
    return list(seen)
