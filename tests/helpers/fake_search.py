"""A local stand-in for DuckDuckGo's HTML endpoint and the pages it links to: an aiohttp server
on 127.0.0.1 in a thread. ``/html/?q=...`` answers with DuckDuckGo-shaped result blocks (links
through the ``/l/?uddg=`` redirect, as the real one) for every page in `PAGES`; ``/page/NAME``
serves the page; ``/page/broken`` fails. Pages are linked as ``127.0.0.1`` or ``localhost``, two
domains for the filter tests. Queries received are kept in ``server.queries``."""

from __future__ import annotations

import asyncio
import html
import threading
import urllib.parse

from aiohttp import web

# name: (host, title, snippet, body text)
PAGES = {
    "paris": ("127.0.0.1", "Paris - capital of France", "Paris is the capital and largest city of France.",
              "Paris is the capital of France. The Eiffel Tower stands in Paris on the Seine. " * 5),
    "bananas": ("localhost", "Bananas: a fruit", "Bananas are elongated edible fruits.",
                "Bananas grow in tropical regions and are rich in potassium. Bananas are yellow when ripe. " * 5),
    "rust": ("127.0.0.1", "The Rust language", "Rust is a systems programming language.",
             "Rust guarantees memory safety without a garbage collector, through ownership and borrowing. " * 5),
    "broken": ("localhost", "A page that fails", "This page returns an error.", ""),
}


class FakeSearch:
    def __init__(self) -> None:
        self.queries: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fake-search")
        self.runner: web.AppRunner | None = None
        self.port = 0

    def url_of(self, name: str) -> str:
        host = PAGES[name][0]
        return f"http://{host}:{self.port}/page/{name}"

    @property
    def search_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/html/"

    async def _results(self, request: web.Request) -> web.Response:
        self.queries.append(request.query.get("q", ""))
        blocks = []
        for name, (_, title, snippet, _) in PAGES.items():
            href = "//duckduckgo.com/l/?uddg=" + urllib.parse.quote(self.url_of(name), safe="") + "&rut=abc"
            blocks.append(
                f'<div class="result results_links web-result"><div class="links_main result__body">'
                f'<h2 class="result__title"><a rel="nofollow" class="result__a" href="{html.escape(href)}">'
                f'{html.escape(title)}</a></h2>'
                f'<a class="result__url" href="{html.escape(href)}">{html.escape(self.url_of(name)[7:])}</a>'
                f'<a class="result__snippet" href="{html.escape(href)}">{html.escape(snippet)}</a>'
                f'</div></div>')
        page = "<html><body><div id='links'>" + "".join(blocks) + "</div></body></html>"
        return web.Response(text=page, content_type="text/html")

    async def _page(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in PAGES or name == "broken":
            return web.Response(status=500, text="boom")
        _, title, _, body = PAGES[name]
        page = (f"<html><head><title>{title}</title><style>p {{color: red}}</style>"
                f"<script>var tracking = 1;</script></head><body><nav>Home | About</nav>"
                f"<article><h1>{title}</h1><p>{html.escape(body)}</p></article><footer>(c) site</footer></body></html>")
        return web.Response(text=page, content_type="text/html")

    def start(self) -> FakeSearch:
        async def boot() -> None:
            app = web.Application()
            app.router.add_get("/html/", self._results)
            app.router.add_get("/page/{name}", self._page)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.thread.start()
        asyncio.run_coroutine_threadsafe(boot(), self.loop).result(30)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
