"""`mistralrs from-config -f config.toml`: run or serve from mistral.rs's TOML format, with
several models behind one server (routed by the request's `model` field)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, metavar="FILE", help="the TOML configuration file")


def run(args: argparse.Namespace) -> int:
    from mistralrs.config import load_config, service_options
    from mistralrs.plugins import get_registry
    from mistralrs.tool_calling import ToolConfig
    from mistralrs.tools import build_toolbox

    cfg = load_config(args.file)
    if cfg.global_.seed is None and getattr(args, "global_seed", None) is not None:
        cfg.global_.seed = args.global_seed
    if cfg.global_.log is None and getattr(args, "global_log", None):
        cfg.global_.log = args.global_log
    options = {m.model_id: service_options(cfg, m) for m in cfg.models}
    mcp_config = cfg.runtime.mcp_config
    if mcp_config and not os.path.isabs(mcp_config) and not os.path.exists(mcp_config):
        mcp_config = os.path.join(os.path.dirname(cfg.path), mcp_config)  # relative to the TOML file
    mcp_config = mcp_config or os.environ.get("MCP_CONFIG_PATH") or None
    toolbox = build_toolbox(get_registry(), mcp_config=mcp_config, flag="[runtime] mcp_config")
    tools = ToolConfig(max_tool_rounds=cfg.server.max_tool_rounds if cfg.server.max_tool_rounds is not None else 8,
                       toolbox=toolbox)
    try:
        if cfg.runtime.enable_search:
            from mistralrs.web_search.search import WebSearch, backend_from_registry

            tools.search = WebSearch(backend_from_registry(get_registry()))
        return _run(cfg, options, tools)
    finally:
        tools.close()  # MCP sessions and their child processes, the search reranker


def _run(cfg: Any, options: dict[str, Any], tools: Any) -> int:
    from mistralrs.plugins import get_registry
    from mistralrs.services import open_service
    from mistralrs.specs import resolve

    def load_reranker() -> None:
        if cfg.runtime.search_embedding_model and tools.search is not None:
            tools.search.load_reranker(cfg.runtime.search_embedding_model, token_source=cfg.global_.token_source)

    if cfg.command == "run":
        thinking = cfg.enable_thinking if cfg.enable_thinking is not None else cfg.thinking
        (opts,) = options.values()
        chat = resolve(get_registry().frontends.get("interactive").factory)
        service = open_service(opts)
        load_reranker()
        return chat(service, tools=tools, enable_thinking=thinking, reasoning_effort=cfg.reasoning_effort).run()

    default = cfg.default_model_id or cfg.models[0].model_id

    def load_all() -> dict[str, Any]:
        loaded: dict[str, Any] = {}
        try:
            for model_id, opts in options.items():
                loaded[model_id] = open_service(opts)
            load_reranker()
        except BaseException:
            for svc in loaded.values():
                svc.shutdown()
            raise
        return loaded

    factory = resolve(get_registry().frontends.get("openai_server").factory)
    server = factory(
        loader=load_all,
        model_id=default,
        model_ids=list(options),
        host=cfg.server.host,
        port=cfg.server.port,
        api_key=cfg.server.api_key or os.environ.get("MISTRALRS_API_KEY") or None,
        enable_metrics=not cfg.server.disable_metrics,
        request_id_header=not cfg.server.disable_request_id_header,
        tools=tools,
        mcp_port=cfg.server.mcp_port,
        ui=bool(cfg.server.ui) and not cfg.server.no_ui,
    )
    return server.run()
