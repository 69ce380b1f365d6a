"""Server-side tools gathered from every tool-source plugin.

A tool source (`ToolSourceSpec.factory()`) is any object with
``list_tools() -> list[dict]`` returning OpenAI function tools
(``{"type": "function", "function": {"name", "description", "parameters"}}``) and
``call(name, arguments: dict) -> str``. `Toolbox` indexes them by tool name so the engine's
tool loop, `mistralrs tools` and the MCP server all call tools the same way.
"""

from __future__ import annotations

import json
from typing import Any

from mistralrs import json_input
from mistralrs.errors import InvalidRequest, NotFoundError, PluginConflictError
from mistralrs.specs import resolve


class Toolbox:
    def __init__(self, registry: Any, sources: list[str] | None = None) -> None:
        self._sources: dict[str, Any] = {}
        self._owner: dict[str, str] = {}
        self._tools: dict[str, dict[str, Any]] = {}
        for spec in registry.tool_sources:
            if sources is not None and spec.name not in sources:
                continue
            source = resolve(spec.factory)()
            self._sources[spec.name] = source
            for tool in source.list_tools():
                name = tool["function"]["name"]
                if name in self._owner:
                    raise PluginConflictError(
                        f"tool {name!r} is provided by tool sources {self._owner[name]!r} and {spec.name!r}; "
                        "disable one of them"
                    )
                self._owner[name] = spec.name
                self._tools[name] = tool

    def list_tools(self) -> list[dict[str, Any]]:
        return [self._tools[name] for name in sorted(self._tools)]

    def source_of(self, name: str) -> str:
        return self._owner[name]

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
