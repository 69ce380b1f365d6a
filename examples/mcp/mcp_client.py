"""Call mistralrs's MCP server with the official `mcp` SDK client: initialize, list the tools,
call `chat` (its arguments are a chat-completion request) and print the answer.

    mistralrs serve -m demo --mcp-port 8081          # in another terminal
    python examples/mcp/mcp_client.py [http://localhost:8081/mcp]
"""

import asyncio
import os
import sys

from mcp import Client

URL = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_MCP_URL", "http://localhost:8081/mcp")


async def main() -> None:
    async with Client(URL, mode="legacy") as client:  # legacy: the initialize handshake
        print(f"server: {client.server_info.name} (protocol {client.protocol_version})")
        for tool in (await client.list_tools()).tools:
            print(f"tool: {tool.name}: {tool.description}")
        result = await client.call_tool("chat", {
            "messages": [{"role": "user", "content": "Say hello in French."}],
            "max_tokens": 32,
            "temperature": 0.7,
        })
        print("answer:", result.content[0].text)
        try:
            await client.call_tool("no_such_tool", {})
        except Exception as exc:  # an MCPError with code -32602
            print(f"unknown tool: {exc}")


asyncio.run(main())
