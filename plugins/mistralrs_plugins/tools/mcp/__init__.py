"""The MCP client as a tool source: the tools of the MCP servers in an MCP client config
(`--mcp-config`, `MCP_CONFIG_PATH`, `[runtime] mcp_config`, `Runner(mcp_client_config=...)`)
offered to the model as `<prefix>_<tool>` and called server-side in the tool loop.

Registering imports neither the `mcp` SDK nor torch; the client lives in `client.py`.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ToolSourceSpec


@hookimpl
def register_tool_sources(register):
    register(ToolSourceSpec(
        name="mcp",
        factory="mistralrs_plugins.tools.mcp.client:McpToolSource",
        description="tools of MCP servers (stdio processes, streamable HTTP, WebSocket) from an MCP client "
                    "config (--mcp-config, MCP_CONFIG_PATH); needs the `mcp` package",
    ))
