"""`mistralrs serve [auto|text] -m MODEL`: the command-line side of the HTTP server.

Building the parser imports nothing heavy (`mistralrs --help` stays fast); `run` imports
aiohttp, and the model loads in the background once the socket is listening.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from mistralrs.cli.model_options import add_model_arguments, number

DEFAULT_PORT = 1234
DEFAULT_HOST = "0.0.0.0"
API_KEY_ENV = "MISTRALRS_API_KEY"
MCP_CONFIG_ENV = "MCP_CONFIG_PATH"


_port = number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")
_seconds = number(float, lambda v: v >= 0, "a number of seconds >= 0")
_rounds = number(int, lambda v: v >= 0, "a number of rounds >= 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, max_seqs_default=32)
    srv = parser.add_argument_group("server")
    srv.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                     help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free port)")
    srv.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    srv.add_argument("--api-key", metavar="KEY",
                     help=f"require `Authorization: Bearer KEY` on every route but /health (env {API_KEY_ENV})")
    srv.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                     help="on SIGINT/SIGTERM, how long to let in-flight requests finish (default 30)")
    srv.add_argument("--disable-metrics", action="store_true", help="answer 503 on /metrics")
    srv.add_argument("--disable-request-id-header", action="store_true",
                     help="do not echo x-request-id in responses")
    srv.add_argument("--mcp-port", type=_port, default=None, metavar="PORT",
                     help="also serve MCP (streamable HTTP at /mcp: a `chat` tool) on this port (0: a free one)")
    srv.add_argument("--ui", action="store_true", help="serve the built-in web chat UI at /ui")
    add_tool_arguments(parser)


def add_tool_arguments(parser: argparse.ArgumentParser) -> None:
    """Tool-calling and reasoning flags (shared by `serve` and `run`)."""
    grp = parser.add_argument_group("tool calling and reasoning")
    grp.add_argument("--tool-parser", metavar="NAME",
                     help="tool-call parser to use (hermes, llama3, mistral, deepseek, json, or a plugin's); "
                          "default: chosen from the chat template and model type")
    grp.add_argument("--reasoning-parser", metavar="NAME",
                     help="reasoning parser (think, or a plugin's; `none` turns reasoning parsing off); "
                          "default: chosen from the chat template and model type")
    grp.add_argument("--enable-tool-sources", nargs="?", const="all", default=None, metavar="NAMES",
                     help="offer the tools of tool-source plugins (see `mistralrs tools list`) to the model and "
                          "run them server-side; optionally a comma-separated list of sources (default: off)")
    grp.add_argument("--enable-search", action="store_true",
                     help="offer web-search tools to requests that send web_search_options (docs/web-search.md)")
    grp.add_argument("--search-embedding-model", metavar="MODEL",
                     help="rerank search results with this embedding model (embedding-gemma, or any embedding "
                          "model id or directory); needs --enable-search")
    grp.add_argument("--search-backend", metavar="NAME",
                     help="the search backend plugin (default: the highest-priority one, duckduckgo)")
    grp.add_argument("--mcp-config", metavar="PATH",
                     help="MCP client config (JSON): connect to these MCP servers and offer their tools to the model "
                          f"as <prefix>_<tool>, run server-side (env {MCP_CONFIG_ENV} when not given)")
    grp.add_argument("--max-tool-rounds", type=_rounds, default=8, metavar="N",
                     help="server-side tool calls per request before the answer is returned "
                          "(requests may set max_tool_rounds; capped at 256; default 8)")


def tool_config_from_args(args: argparse.Namespace) -> Any:
    """The `ToolConfig` of the tool flags; unknown parser or source names are a ConfigError."""
    from mistralrs.errors import ConfigError
    from mistralrs.plugins import get_registry
    from mistralrs.tool_choice import ToolConfig

    registry = get_registry()
    for flag, value, catalogue in (("--tool-parser", args.tool_parser, registry.tool_parsers),
                                   ("--reasoning-parser", args.reasoning_parser, registry.reasoning_parsers)):
        if value and not (flag == "--reasoning-parser" and value.lower() in ("none", "off")) \
                and value not in catalogue.names():
            raise ConfigError(f"{flag}: no parser named {value!r}; available: {', '.join(catalogue.names())}")
    from mistralrs.tools import build_toolbox

    search = None
    if getattr(args, "search_embedding_model", None) and not args.enable_search:
        raise ConfigError("--search-embedding-model reranks web search results; give --enable-search with it")
    if getattr(args, "search_backend", None) and not args.enable_search:
        raise ConfigError("--search-backend picks the web search backend; give --enable-search with it")
    if getattr(args, "enable_search", False):
        from mistralrs.web_search.search import WebSearch, backend_from_registry

        search = WebSearch(backend_from_registry(registry, args.search_backend))
    mcp_config = getattr(args, "mcp_config", None) or os.environ.get(MCP_CONFIG_ENV) or None
    toolbox = build_toolbox(registry, getattr(args, "enable_tool_sources", None), mcp_config=mcp_config,
                            flag="--enable-tool-sources")
    return ToolConfig(tool_parser=args.tool_parser, reasoning_parser=args.reasoning_parser, toolbox=toolbox,
                      max_tool_rounds=args.max_tool_rounds, search=search)


def load_search_reranker(args: argparse.Namespace, tools: Any) -> None:
    """--search-embedding-model: the reranker loads with the model (in the loader's thread)."""
    model = getattr(args, "search_embedding_model", None)
    if model and tools.search is not None:
        tools.search.load_reranker(model, cpu=args.cpu, hf_cache=args.hf_cache, token_source=args.token_source)


def replica_main(args: argparse.Namespace) -> None:
    """A data-parallel replica (`replicas.py`): the ordinary `serve`, on its private port."""
    import sys

    sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    from mistralrs.cli.model_options import options_from_args
    from mistralrs.errors import ConfigError
    from mistralrs.plugins import get_registry
    from mistralrs.specs import resolve

    opts = options_from_args(args)
    from mistralrs.distributed.world import is_follower

    if is_follower(opts.tensor_parallel_size):  # torchrun / MISTRALRS_MN_* rank other than 0: no HTTP
        from mistralrs.distributed.follower import serve_as_follower

        return serve_as_follower(opts)
    if opts.data_parallel_size > 1:  # N replica servers behind a routing front server
        from mistralrs_plugins.frontends.openai_server.replicas import run_replicated

        if args.mcp_port is not None or args.ui:
            raise ConfigError("--mcp-port and --ui are not available with --data-parallel-size yet; use one replica")
        return run_replicated(args, opts.data_parallel_size)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.mcp_port is not None and args.mcp_port == args.port and args.port != 0:
        raise ConfigError(f"--mcp-port must differ from --port (both are {args.port})")
    tools = tool_config_from_args(args)

    def load() -> Any:
        from mistralrs.services import open_service

        service = open_service(opts)
        load_search_reranker(args, tools)
        return service

    factory = resolve(get_registry().frontends.get("openai_server").factory)
    server = factory(
        loader=load,
        model_id=opts.model_id,
        host=args.host,
        port=args.port,
        api_key=api_key,
        shutdown_timeout=args.shutdown_timeout,
        enable_metrics=not args.disable_metrics,
        request_id_header=not args.disable_request_id_header,
        tools=tools,
        mcp_port=args.mcp_port,
        ui=args.ui,
    )
    try:
        return server.run()
    finally:
        tools.close()
