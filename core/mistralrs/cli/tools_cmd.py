"""`mistralrs tools list|call`: the tools that tool-source plugins provide."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tools_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list every tool with its source")
    ls.add_argument("--json", action="store_true", help="print the OpenAI tool schemas as JSON")
    call = sub.add_parser("call", help="call a tool and print its result")
    call.add_argument("name", help="tool name")
    call.add_argument("arguments", nargs="?", default="{}", help="arguments as a JSON object")


def run(args: argparse.Namespace) -> int:
    from mistralrs.plugins import get_registry
    from mistralrs.tools import Toolbox

    toolbox = Toolbox(get_registry())
    if args.tools_action == "list":
        tools = toolbox.list_tools()
        if args.json:
            print(json.dumps(tools, indent=2))
        else:
            for tool in tools:
                fn = tool["function"]
                print(f"{fn['name']}  [{toolbox.source_of(fn['name'])}]  {fn.get('description', '')}")
        return 0
    print(toolbox.call(args.name, args.arguments))
    return 0
