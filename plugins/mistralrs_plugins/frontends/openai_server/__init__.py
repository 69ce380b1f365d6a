"""The OpenAI-compatible HTTP server (`mistralrs serve`).

This module only registers the frontend and the `serve` command; it imports neither aiohttp
nor torch. The server lives in `app.py` (the application and the `OpenAIServer` runner),
`state.py` (what handlers share), `middleware.py` (auth, CORS, errors), `routes.py` (the
handlers), `generation.py` (collecting and streaming engine requests as SSE), `responses*.py`
(the Responses API), `common.py` (errors, JSON bodies, SSE framing), `metrics.py`
(Prometheus), `openapi.py` (the OpenAPI document and /docs) and `cli.py`.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import CommandSpec, FrontendSpec


@hookimpl
def register_frontends(register):
    register(FrontendSpec(
        name="openai_server",
        factory="mistralrs_plugins.frontends.openai_server.app:OpenAIServer",
        description="OpenAI-compatible HTTP API (chat, completions, responses, metrics) on aiohttp",
    ))


@hookimpl
def register_commands(cli):
    cli.add_command(CommandSpec(
        name="serve",
        help="Serve a model over an OpenAI-compatible HTTP API",
        add_arguments="mistralrs_plugins.frontends.openai_server.cli:add_arguments",
        run="mistralrs_plugins.frontends.openai_server.cli:run",
    ))
