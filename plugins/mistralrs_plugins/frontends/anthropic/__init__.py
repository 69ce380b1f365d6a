"""The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) on the
`serve` HTTP server, over the same engine and chat machinery as `/v1/chat/completions`.

Registering imports neither aiohttp nor torch: the request side lives in `request.py` (an
Anthropic body as the chat body it means), the response side in `response.py` (the message
object, the stream's events, the error envelope) and the handlers in `routes.py`, whose
`mount(app)` the server calls (`FrontendSpec.mount`).
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import FrontendSpec


@hookimpl
def register_frontends(register):
    register(FrontendSpec(
        name="anthropic",
        mount="mistralrs_plugins.frontends.anthropic.routes:mount",
        description="Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) on the `serve` server",
    ))
