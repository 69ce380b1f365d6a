"""`mistralrs tools list|call`: the tools that tool-source plugins provide (MCP servers' tools
included, from `--mcp-config` or MCP_CONFIG_PATH)."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tools_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list every tool with its source")
    ls.add_argument("--json", action="store_true", help="print the OpenAI tool schemas as JSON")
    call = sub.add_parser("call", help="call a tool and print its result")
    call.add_argument("name", help="tool name")
    call.add_argument("arguments", nargs="?", default="{}", help="arguments as a JSON object")
    for p in (ls, call):
        p.add_argument("--mcp-config", metavar="PATH",
                       help="MCP client config (JSON) whose servers' tools to include (env MCP_CONFIG_PATH)")


def run(args: argparse.Namespace) -> int:
    from mistralrs.plugins import get_registry
    from mistralrs.tools import build_toolbox

    mcp_config = args.mcp_config or os.environ.get("MCP_CONFIG_PATH") or None
    toolbox = build_toolbox(get_registry(), True, mcp_config=mcp_config)
    assert toolbox is not None
    try:
        if args.tools_action == "list":
            tools = toolbox.list_tools()
            if args.json:
                print(json.dumps(tools, indent=2))
            else:
                offered = {t["function"]["name"] for t in toolbox.offered_tools()}
                for tool in tools:
                    fn = tool["function"]
                    note = "" if fn["name"] in offered else " (not offered to the model: auto_register_tools is false)"
                    print(f"{fn['name']}  [{toolbox.source_of(fn['name'])}]  {fn.get('description', '')}{note}")
                info = toolbox.info()
                if "mcp_servers_connected" in info:
                    print(f"MCP: {info['mcp_servers_connected']} server(s) connected, "
                          f"{info['mcp_tools_count']} tool(s)")
            return 0
        print(toolbox.call(args.name, args.arguments))
        return 0
    finally:
        toolbox.close()
