"""The MCP server (`serve --mcp-port P`, `[server] mcp_port`): the served models as MCP tools
over streamable HTTP at `/mcp`, on its own port, next to the OpenAI HTTP API.

Registering imports neither the `mcp` SDK nor torch; the server lives in `server.py`.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import FrontendSpec


@hookimpl
def register_frontends(register):
    register(FrontendSpec(
        name="mcp_server",
        factory="mistralrs_plugins.frontends.mcp_server.server:McpServer",
        description="MCP over streamable HTTP at /mcp: a `chat` tool per served model (needs the `mcp` package)",
    ))
