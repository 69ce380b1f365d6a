"""Tool calls as the parsers report them (`ToolCall`, streamed `ToolCallDelta`s, `ParsedOutput`)
and the JSON helpers that turn what a model wrote into (name, arguments-string) pairs:
`normalize_arguments` and `calls_from_json`, over strict JSON (no NaN/Infinity)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

import attrs

from mistralrs import json_input


@attrs.frozen
class ToolCall:
    """One complete tool call. `arguments` is a JSON string (an object), as in OpenAI."""

    id: str
    name: str
    arguments: str


@attrs.frozen
class ToolCallDelta:
    """A piece of a streamed tool call. `index` numbers the calls of one output from 0;
    `id` and `name` are set on the first delta of a call only, and the `arguments`
    fragments of one index concatenate to the call's arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


def _tool_call_list(calls: Iterable[ToolCall]) -> list[ToolCall]:
    return list(calls)


@attrs.frozen
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = attrs.field(factory=list, converter=_tool_call_list)


def new_tool_call_id() -> str:
    """A fresh tool-call id, ``call-<uuid4>`` like mistral.rs."""
    return f"call-{uuid.uuid4()}"


def merge_tool_call_deltas(deltas: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """Merge streamed deltas into calls the way an OpenAI client does: by index, id and name
    from the first delta of each index, arguments concatenated."""
    merged: dict[int, list[Any]] = {}
    for d in deltas:
        slot = merged.setdefault(d.index, [None, None, ""])
        if d.id is not None and slot[0] is None:
            slot[0] = d.id
        if d.name is not None and slot[1] is None:
            slot[1] = d.name
        slot[2] += d.arguments
    return [ToolCall(id=s[0] or "", name=s[1] or "", arguments=s[2]) for _, s in sorted(merged.items())]


# --------------------------------------------------------------------------------------
# Normalising what a model wrote into (name, arguments-string)
# --------------------------------------------------------------------------------------
def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str) -> Any:
    """Strict JSON (no NaN/Infinity, which would not survive a strict client)."""
    return json_input.loads(text, parse_constant=_no_constants)


def normalize_arguments(raw: Any) -> str | None:
    """Tool arguments as a JSON object string, or None if `raw` is not usable.

    An object is dumped (``ensure_ascii=False``); a string is kept as written if it holds a
    JSON object; missing/null/empty arguments become ``"{}"``; anything else is rejected."""
    if raw is None:
        return "{}"
    if isinstance(raw, dict):
        return json.dumps(raw, ensure_ascii=False)
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return "{}"
        try:
            value = strict_loads(text)
        except ValueError:
            return None
        return text if isinstance(value, dict) else None
    return None


_CALL_KEYS = frozenset({"name", "function", "arguments", "parameters", "type", "id"})


def _call_from_obj(obj: Any, *, require_arguments: bool) -> tuple[str, str] | None:
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function")
    if isinstance(fn, dict):  # OpenAI form {"type": "function", "function": {"name", "arguments"}}
        if set(obj) - {"function", "type", "id"} or obj.get("type", "function") != "function":
            return None
        obj = fn
    if set(obj) - _CALL_KEYS or obj.get("type", "function") != "function":
        return None
    name = obj.get("name", obj.get("function"))
    if not isinstance(name, str) or not name.strip():
        return None
    if "arguments" in obj and "parameters" in obj:
        return None
    if "arguments" in obj:
        raw = obj["arguments"]
    elif "parameters" in obj:
        raw = obj["parameters"]
    elif require_arguments:
        return None
    else:
        raw = None
    arguments = normalize_arguments(raw)
    if arguments is None:
        return None
    return name.strip(), arguments


def calls_from_json(value: Any, *, require_arguments: bool = True) -> list[tuple[str, str]] | None:
    """``(name, arguments)`` pairs from a decoded JSON call object or non-empty list of them,
    or None if `value` is not that. A call object has ``name`` (alias ``function``) and
    ``arguments`` (alias ``parameters``; an object or a string holding one), optionally
    ``type: "function"`` and ``id``; the nested OpenAI form is accepted too. Objects with
    other keys are not calls. `require_arguments=False` (inside explicit call markers)
    accepts a call without arguments as ``{}``."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        call = _call_from_obj(item, require_arguments=require_arguments)
        if call is None:
            return None
        calls.append(call)
    return calls

