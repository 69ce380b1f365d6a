"""The DuckDuckGo HTML backend: ``GET <url>?q=QUERY`` (default
https://html.duckduckgo.com/html/), the result list parsed from its ``result`` blocks (title
link, snippet, URL), then up to 10 result pages fetched at once and reduced to their text. A
page that cannot be fetched is dropped, as mistral.rs drops it."""

from __future__ import annotations

import concurrent.futures
import os
import platform
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

from mistralrs import __version__
from mistralrs.errors import MistralRsError
from mistralrs.web_search.html_text import html_to_text
from mistralrs.web_search.results import SearchResult

DEFAULT_URL = "https://html.duckduckgo.com/html/"
TIMEOUT = 10.0
MAX_PAGE_BYTES = 4 * 1024 * 1024
USER_AGENT = f"mistralrs/{__version__} ({platform.system()}; {platform.machine()})"


class SearchFailed(MistralRsError):
    pass


class _Results(HTMLParser):
    """DuckDuckGo's result blocks: ``class="result"`` containing ``result__a`` (title, link),
    ``result__snippet`` and ``result__url``."""

    FIELDS = {"result__a": "title", "result__snippet": "description", "result__url": "display_url"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.results: list[dict[str, str]] = []
        self.field: str | None = None
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if self.field is not None:
            self.depth += 1
            return
        if "result" in classes:
            self.results.append({"title": "", "description": "", "display_url": "", "href": ""})
            return
        for cls, field in self.FIELDS.items():
            if cls in classes and self.results:
                self.field, self.depth = field, 1
                if field == "title":
                    self.results[-1]["href"] = a.get("href") or ""
                return

    def handle_endtag(self, tag: str) -> None:
        if self.field is not None:
            self.depth -= 1
            if self.depth == 0:
                self.field = None

    def handle_data(self, data: str) -> None:
        if self.field is not None and self.results:
            self.results[-1][self.field] += data


def _target(href: str, display: str) -> str:
    """The result's URL: DuckDuckGo links go through its redirect (``/l/?uddg=<url>``)."""
    if href:
        parsed = urllib.parse.urlsplit(href if "//" in href else "https://duckduckgo.com" + href)
        uddg = urllib.parse.parse_qs(parsed.query).get("uddg")
        if uddg:
            return uddg[0]
        if href.startswith(("http://", "https://")):
            return href
    display = display.strip()
    return display if display.startswith("http") else ("https://" + display if display else "")


def parse_results(page: str, max_results: int) -> list[SearchResult]:
    parser = _Results()
    parser.feed(page)
    out = []
    for r in parser.results:
        title, desc = " ".join(r["title"].split()), " ".join(r["description"].split())
        url = _target(r["href"], r["display_url"])
        if title and desc and url:
            out.append(SearchResult(title, desc, url))
        if len(out) >= max_results:
            break
    return out


def fetch(url: str) -> str:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "text/html,*/*"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 - http(s) URLs only (checked by callers)
        raw = resp.read(MAX_PAGE_BYTES)
        charset = resp.headers.get_content_charset() or "utf-8"
    return raw.decode(charset, errors="replace")


class DuckDuckGo:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or os.environ.get("MISTRALRS_SEARCH_URL") or DEFAULT_URL

    def search(self, query: str, max_results: int = 10) -> list[SearchResult]:
        sep = "&" if "?" in self.url else "?"
        try:
            page = fetch(f"{self.url}{sep}q={urllib.parse.quote_plus(query)}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SearchFailed(f"the search request to {self.url} failed: {exc}") from None
        results = parse_results(page, max_results)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(results), 1)) as pool:
            pages = list(pool.map(self._page_text, [r.url for r in results]))
        kept = []
        for r, text in zip(results, pages):
            if text is not None:
                r.content = text
                kept.append(r)
        return kept

    def _page_text(self, url: str) -> str | None:
        if not url.startswith(("http://", "https://")):
            return None
        try:
            return html_to_text(fetch(url))
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def extract(self, url: str) -> str:
        try:
            return html_to_text(fetch(url))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SearchFailed(f"could not fetch {url}: {exc}") from None
