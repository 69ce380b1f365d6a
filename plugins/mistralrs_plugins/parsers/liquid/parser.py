"""Implementation of the Liquid tool-call parser (registered in `__init__.py`).

Format (LFM2's chat template): ``<|tool_call_start|>[f(a="x", b=1), g()]<|tool_call_end|>``, a
Python-style list of calls with keyword arguments whose values are Python (or JSON: ``true``,
``false``, ``null``) literals. Arguments whose names are not identifiers are written
``f(**{"a b": 1})``. The closing marker may be missing at the very end of the output.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from typing import Any

from mistralrs.parse_toolkit import NeedMore, Reject
from mistralrs.parsing import Cursor, ToolCallParser

_NAME = re.compile(r"[\w.:\-]+")
_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_key(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _key(node: ast.AST | None) -> str:
    value = _literal(node) if node is not None else None
    if not isinstance(value, str):
        raise ValueError("argument names are strings")
    return value


def _arguments(inner: str) -> dict[str, Any]:
    call = ast.parse(f"f({inner})", mode="eval").body
    if not isinstance(call, ast.Call) or call.args:
        raise ValueError("keyword arguments only")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:  # **{...}
            value = _literal(kw.value)
            if not isinstance(value, dict):
                raise ValueError("** needs a dict")
            out.update(value)
        else:
            out[kw.arg] = _literal(kw.value)
    return out


def _close_paren(text: str, start: int) -> int:
    """Index of the ``)`` closing the call whose ``(`` is just before `start` (-1: not there)."""
    depth, i, quote = 0, start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return i if ch == ")" else -1
            depth -= 1
        i += 1
    return -1


def parse_calls(body: str) -> list[tuple[str, str]]:
    """``[f(a=1), g()]`` -> [(name, arguments JSON)]; ValueError/SyntaxError when it is not that."""
    text = body.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError("a list of calls")
    pos, end, calls = 1, len(text) - 1, []
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos == end and not calls:
            raise ValueError("no calls")
        m = _NAME.match(text, pos)
        if m is None or m.end() >= end or text[m.end()] != "(":
            raise ValueError("name(")
        close = _close_paren(text, m.end() + 1)
        if close < 0:
            raise ValueError("unclosed call")
        args = _arguments(text[m.end() + 1:close])
        calls.append((m.group(), json.dumps(args, ensure_ascii=False)))
        pos = close + 1
        while pos < end and text[pos].isspace():
            pos += 1
        if pos == end:
            return calls
        if text[pos] != ",":
            raise ValueError("calls are separated by commas")
        pos += 1


def _render(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


class LiquidToolParser(ToolCallParser):
    name = "liquid"
    open_tag = "<|tool_call_start|>"
    close_tag = "<|tool_call_end|>"
    start_markers = (open_tag,)

    def render_call(self, name: str, arguments: str) -> str:
        args = json.loads(arguments)
        # ASCII identifiers only: Python folds other identifiers to NFKC, which would rename them
        if all(k.isascii() and k.isidentifier() and not keyword.iskeyword(k) for k in args):
            inner = ", ".join(f"{k}={_render(v)}" for k, v in args.items())
        else:
            inner = f"**{_render(args)}"
        return f"{self.open_tag}[{name}({inner})]{self.close_tag}"

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        end = cur.text.find(self.close_tag, cur.pos)
        if end < 0:
            if not cur.final:
                raise NeedMore
            body, after = cur.text[cur.pos:], len(cur.text)
        else:
            body, after = cur.text[cur.pos:end], end + len(self.close_tag)
        try:
            calls = parse_calls(body)
        except (ValueError, SyntaxError, RecursionError):
            raise Reject from None
        cur.pos = after
        return calls
