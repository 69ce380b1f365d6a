"""Server-side tools gathered from every tool-source plugin.

A tool source (`ToolSourceSpec.factory()`) is any object with
``list_tools() -> list[dict]`` returning OpenAI function tools
(``{"type": "function", "function": {"name", "description", "parameters"}}``) and
``call(name, arguments: dict) -> str``. Optionally it has ``offered_tools()`` (the subset
offered to the model; default: all), ``info() -> dict`` (status fields for `/v1/models`,
such as the MCP client's ``mcp_tools_count``) and ``close()`` (called on shutdown). A source
that takes settings (the MCP client's config) gets them as the factory's one argument when
the caller passes ``configs={source_name: settings}``. `Toolbox` indexes the sources by tool
name so the engine's tool loop, `mistralrs tools` and the MCP server all call tools the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs import json_input
from mistralrs.errors import ConfigError, InvalidRequest, NotFoundError, PluginConflictError
from mistralrs.specs import resolve

log = logging.getLogger("mistralrs.tools")


class Toolbox:
    def __init__(self, registry: Any, sources: list[str] | None = None,
                 configs: Mapping[str, Any] | None = None) -> None:
        self._sources: dict[str, Any] = {}
        self._owner: dict[str, str] = {}
        self._tools: dict[str, dict[str, Any]] = {}
        self._offered: set[str] = set()
        configs = dict(configs or {})
        try:
            for spec in registry.tool_sources:
                if sources is not None and spec.name not in sources:
                    continue
                factory = resolve(spec.factory)
                source = factory(configs[spec.name]) if configs.get(spec.name) is not None else factory()
                self._sources[spec.name] = source
                offered_fn = getattr(source, "offered_tools", None)
                offered = {t["function"]["name"] for t in (offered_fn() if offered_fn else source.list_tools())}
                for tool in source.list_tools():
                    name = tool["function"]["name"]
                    if name in self._owner:
                        raise PluginConflictError(
                            f"tool {name!r} is provided by tool sources {self._owner[name]!r} and {spec.name!r}; "
                            "disable one of them"
                        )
                    self._owner[name] = spec.name
                    self._tools[name] = tool
                    if name in offered:
                        self._offered.add(name)
        except BaseException:
            self.close()
            raise

    def list_tools(self) -> list[dict[str, Any]]:
        return [self._tools[name] for name in sorted(self._tools)]

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools offered to the model in every request (a source may list tools it does not offer)."""
        return [self._tools[name] for name in sorted(self._offered)]

    def source_of(self, name: str) -> str:
        return self._owner[name]

    def info(self) -> dict[str, Any]:
        """Status fields of the sources (`mcp_tools_count`, `mcp_servers_connected`, ...)."""
        out: dict[str, Any] = {}
        for source in self._sources.values():
            info = getattr(source, "info", None)
            if info is not None:
                out.update(info())
        return out

    def close(self) -> None:
        """Close every source that holds resources (MCP connections, child processes)."""
        for name, source in list(self._sources.items()):
            close = getattr(source, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shutting down: report and go on
                log.warning("tool source %s did not close cleanly: %s", name, exc)

    def call(self, name: str, arguments: dict[str, Any] | str) -> str:
        if name not in self._tools:
            raise NotFoundError(f"unknown tool {name!r}; available: {', '.join(sorted(self._tools)) or 'none'}")
        if isinstance(arguments, str):
            try:
                arguments = json_input.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidRequest(
                    f"tool arguments are not valid JSON ({exc.msg}); pass a JSON object", "arguments"
                ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequest("tool arguments must be a JSON object", "arguments")
        return self._sources[self._owner[name]].call(name, arguments)


MCP_SOURCE = "mcp"  # the tool source that reads an MCP client config (mistralrs_plugins.tools.mcp)


def build_toolbox(registry: Any, enable: bool | str | Sequence[str] | None = None, *, mcp_config: Any = None,
                  flag: str = "enable_tool_sources") -> Toolbox | None:
    """The toolbox of a frontend, or None when it has no tool sources: `enable` is True / "all"
    (every source), a list or comma-separated names, or falsy (none); an MCP client config (an
    `McpClientConfig`, a dict or a JSON file path) adds the `mcp` source with that config."""
    from mistralrs.mcp_config import as_mcp_config

    config = as_mcp_config(mcp_config)
    names: list[str] | None
    if enable is True or enable == "all":
        names = None
    elif isinstance(enable, str):
        names = [n.strip() for n in enable.split(",") if n.strip()]
    else:
        names = list(enable or ())
    available = registry.tool_sources.names()
    unknown = [n for n in names or () if n not in available]
    if unknown:
        raise ConfigError(f"{flag}: no tool source named {', '.join(unknown)}; "
                          f"available: {', '.join(available) or 'none'}")
    if config is not None:
        if MCP_SOURCE not in available:
            raise ConfigError(f"an MCP client config needs the {MCP_SOURCE!r} tool source, which is not installed "
                              "or is blocked (see `mistralrs plugins`)")
        if names is not None and MCP_SOURCE not in names:
            names.append(MCP_SOURCE)
    if names is not None and not names:
        return None
    return Toolbox(registry, names, {MCP_SOURCE: config} if config is not None else None)
