"""The web UI's routes: `GET /ui` (redirects to `/ui/`) and the files of `static/` under `/ui/`.
They answer without an API key (the page asks for the key and sends it with its API calls)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from mistralrs_plugins.frontends.openai_server.middleware import OPEN_PREFIXES

STATIC = Path(__file__).parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def to_index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def mount(app: web.Application) -> None:
    app.router.add_get("/ui", to_index)
    app.router.add_get("/ui/", index)
    app.router.add_static("/ui/", STATIC, name="webui", append_version=False)
    prefixes = app.get(OPEN_PREFIXES)
    if prefixes is None:
        prefixes = app[OPEN_PREFIXES] = []
    prefixes.append("/ui")
