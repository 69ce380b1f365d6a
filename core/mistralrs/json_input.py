"""JSON from clients, with a cap on nesting.

Python's parser raises RecursionError on deep input (100,000 nested `[`), and what parses
just under the interpreter's limit still breaks any recursive code that walks it later
(templates, schema compilers, `json.dumps`). Every JSON a client sends goes through `loads`,
which refuses nesting past MAX_DEPTH with a ValueError, the same error as malformed JSON.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 128
"""Deepest nesting of objects and arrays accepted (a JSON schema 60 levels deep fits)."""


class TooDeep(json.JSONDecodeError):
    """Caught wherever malformed JSON is (it is a JSONDecodeError, so a ValueError)."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels", "", 0)

    def __str__(self) -> str:
        return self.msg


def loads(data: str | bytes | bytearray, **kwargs: Any) -> Any:
    """`json.loads(data, **kwargs)`, refusing nesting deeper than MAX_DEPTH (TooDeep)."""
    try:
        value = json.loads(data, **kwargs)
    except RecursionError:
        raise TooDeep() from None
    if too_deep(value):
        raise TooDeep()
    return value


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests lists/dicts deeper than `limit` (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False
