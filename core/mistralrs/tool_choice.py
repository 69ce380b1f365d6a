"""Which tools a chat request offers and may call: the frontend-wide `ToolConfig` (parser
overrides, server-side tools, the round cap), `tools` normalised to the nested OpenAI form, and
`tool_choice` resolved against them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from mistralrs import json_input
from mistralrs.errors import InvalidRequest
from mistralrs.request_limits import MAX_TOOLS, check_count

log = logging.getLogger("mistralrs.tools")

DEFAULT_MAX_TOOL_ROUNDS = 8
MAX_TOOL_ROUNDS_CAP = 256


# --------------------------------------------------------------------------------------
# Configuration shared by every request of a frontend
# --------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class ToolConfig:
    """Frontend-wide tool settings: parser overrides, server-side tools and the round cap.

    `callbacks` maps a tool name to `fn(name, arguments: dict) -> str`; a callback runs when
    the model calls a tool of that name that the request declares in `tools`. `toolbox`
    (a `mistralrs.tools.Toolbox`) provides tools of its own: they are offered to the model
    in every request (unless `tool_choice` is "none") and executed server-side. `search` adds
    the web-search tools to requests that carry ``web_search_options``."""

    tool_parser: str | None = None
    reasoning_parser: str | None = None
    callbacks: Mapping[str, Callable[[str, dict[str, Any]], Any]] = attrs.field(factory=dict)
    toolbox: Any = None
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS
    search: Any = None  # a `web_search.search.WebSearch` (--enable-search): requests opt in with web_search_options

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.max_tool_rounds, int) or not 0 <= self.max_tool_rounds:
            raise InvalidRequest(f"max_tool_rounds must be an integer >= 0, got {self.max_tool_rounds!r}",
                                 "max_tool_rounds")
        self.max_tool_rounds = min(self.max_tool_rounds, MAX_TOOL_ROUNDS_CAP)
        for name, fn in self.callbacks.items():
            if not callable(fn):
                raise InvalidRequest(f"tool callback {name!r} is not callable", "tool_callbacks")

    def toolbox_tools(self) -> list[dict[str, Any]]:
        """The toolbox's tools offered to the model in every request."""
        if self.toolbox is None:
            return []
        offered = getattr(self.toolbox, "offered_tools", None)
        return list(offered() if offered is not None else self.toolbox.list_tools())

    def status(self) -> dict[str, Any]:
        """What `/v1/models` reports: `tools_available`, plus the toolbox's own fields
        (`mcp_tools_count`, `mcp_servers_connected` with an MCP client)."""
        info = getattr(self.toolbox, "info", None)
        return {"tools_available": bool(self.callbacks or self.toolbox_tools()), **(info() if info else {})}

    def close(self) -> None:
        """Release the toolbox (MCP connections and child processes) and the search reranker."""
        close = getattr(self.toolbox, "close", None)
        if close is not None:
            close()
        if self.search is not None:
            self.search.shutdown()

    def call(self, name: str, arguments: str) -> str:
        """Run a server-side tool; errors become the result text (the model sees them)."""
        try:
            args = json_input.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return f"error: the arguments are not valid JSON ({exc.msg})"
        try:
            if name in self.callbacks:
                result = self.callbacks[name](name, args)
            elif self.toolbox is not None:
                result = self.toolbox.call(name, args)
            else:  # pragma: no cover - callers only call known tools
                return f"error: unknown tool {name!r}"
        except Exception as exc:  # noqa: BLE001 - a failing tool is reported to the model
            log.warning("tool %s failed: %s: %s", name, type(exc).__name__, exc)
            return f"error: {type(exc).__name__}: {exc}"
        if result is None:
            return ""
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


# --------------------------------------------------------------------------------------
# tools and tool_choice
# --------------------------------------------------------------------------------------
def normalize_tools(value: Any, *, param: str = "tools") -> list[dict[str, Any]]:
    """Function tools in the nested chat form `{"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}`; the Responses flat form is accepted too."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest("tools must be a list of function tools", param)
    check_count(value, MAX_TOOLS, param, "tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise InvalidRequest(f"tools[{i}] must be an object", param)
        kind = tool.get("type", "function")
        if kind != "function":
            raise InvalidRequest(f"tools[{i}] has type {kind!r}; only function tools are supported", param)
        fn = tool.get("function")
        if fn is None:
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        if not isinstance(fn, Mapping):
            raise InvalidRequest(f"tools[{i}].function must be an object", param)
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest(f"tools[{i}] needs a function name (a non-empty string)", param)
        if name in seen:
            raise InvalidRequest(f"tools[{i}]: the function name {name!r} is declared twice", param)
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", param)
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(f"tools[{i}].function.strict must be true or false", param)
        clean: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            clean["description"] = fn["description"]
        if params is not None:
            clean["parameters"] = dict(params)
        if strict is not None:
            clean["strict"] = strict
        out.append({"type": "function", "function": clean})
    return out


@attrs.frozen
class ToolChoice:
    """`mode` is "none", "auto" or "required"; `names` the tools that may be called (None:
    all offered tools)."""

    mode: str
    names: tuple[str, ...] | None = None


def _choice_name(item: Any, where: str) -> str:
    if isinstance(item, Mapping):
        if item.get("type", "function") != "function":
            raise InvalidRequest(f"{where} has type {item.get('type')!r}; only function tools can be chosen",
                                 "tool_choice")
        fn = item.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else item.get("name")
        if isinstance(name, str) and name:
            return name
    raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{"name": ...}}}} '
                         '(or {"type": "function", "name": ...})', "tool_choice")


def resolve_tool_choice(value: Any, available: Sequence[str]) -> ToolChoice:
    """Validate `tool_choice` against the names of the offered tools."""
    names = list(available)
    if value is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode not in ("none", "auto", "required"):
            raise InvalidRequest(f'tool_choice must be "none", "auto", "required" or a function, got {value!r}',
                                 "tool_choice")
        if mode == "required" and not names:
            raise InvalidRequest('tool_choice "required" needs at least one tool in `tools`', "tool_choice")
        return ToolChoice(mode if names or mode == "none" else "none")
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"tool_choice must be a string or an object, got {type(value).__name__}", "tool_choice")
    if value.get("type") == "allowed_tools":
        inner = value.get("allowed_tools")
        spec: Mapping[str, Any] = inner if isinstance(inner, Mapping) else value
        mode = spec.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise InvalidRequest(f'tool_choice.mode must be "auto" or "required", got {mode!r}', "tool_choice")
        listed = spec.get("tools")
        if not isinstance(listed, list) or not listed:
            raise InvalidRequest("tool_choice.tools must be a non-empty list of functions", "tool_choice")
        chosen = [_choice_name(t, f"tool_choice.tools[{i}]") for i, t in enumerate(listed)]
        for name in chosen:
            if name not in names:
                raise InvalidRequest(f"tool_choice allows {name!r}, which is not among the declared tools "
                                     f"({', '.join(names) or 'none'})", "tool_choice")
        return ToolChoice(mode, tuple(dict.fromkeys(chosen)))
    name = _choice_name(value, "tool_choice")
    if name not in names:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the declared tools "
                             f"({', '.join(names) or 'none'})", "tool_choice")
    return ToolChoice("required", (name,))


def max_tool_rounds_of(body: Mapping[str, Any], default: int) -> int:
    value = body.get("max_tool_rounds")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"max_tool_rounds must be an integer >= 0, got {value!r}", "max_tool_rounds")
    return min(value, MAX_TOOL_ROUNDS_CAP)
