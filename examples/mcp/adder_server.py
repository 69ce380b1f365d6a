"""A stdio MCP server written with the official `mcp` SDK (its FastMCP, named `MCPServer` in mcp 2.x):
one tool, `add`. mistralrs starts it as a child process from `mcp-config.json` and offers the
tool to the model as `adder_add`.

    mistralrs serve -m demo --mcp-config examples/mcp/mcp-config.json
    mistralrs tools list --mcp-config examples/mcp/mcp-config.json
"""

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

server = MCPServer("adder")


@server.tool()
def add(a: Annotated[int, Field(ge=-1000, le=1000)], b: Annotated[int, Field(ge=-1000, le=1000)]) -> int:
    """Add two integers."""
    return a + b


if __name__ == "__main__":
    server.run()  # stdio
