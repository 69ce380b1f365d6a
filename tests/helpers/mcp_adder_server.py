"""A stdio MCP server for the tests, written with the official SDK's MCPServer (FastMCP in mcp 1.x):
`add` adds two integers and `slow` sleeps; every call appends its arguments as a JSON line to the
file named by MCP_TEST_RECORD, so a test can see that the tool really ran (the first line, written at
start, holds the process id).

    python -m tests.helpers.mcp_adder_server      (or run this file)
"""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

# Bounded integers: the schema's minimum/maximum keep a random model's constrained arguments short.
server = MCPServer("adder")


def _record(tool: str, **arguments: object) -> None:
    path = os.environ.get("MCP_TEST_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


@server.tool()
def add(a: Annotated[int, Field(ge=-99, le=99)], b: Annotated[int, Field(ge=-99, le=99)]) -> int:
    """Add two integers."""
    _record("add", a=a, b=b)
    return a + b


@server.tool()
def slow(seconds: Annotated[float, Field(ge=0, le=60)]) -> str:
    """Sleep, then answer (for timeouts)."""
    _record("slow", seconds=seconds)
    time.sleep(seconds)
    return "done"


if __name__ == "__main__":
    _record("started", pid=os.getpid())
    server.run()
