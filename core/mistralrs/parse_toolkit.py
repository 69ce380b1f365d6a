"""The incremental parsing toolkit tool-call and reasoning parsers are built from: `Cursor`
(matching helpers that raise `NeedMore` while the text so far cannot decide, `Reject` when it
cannot match), a resumable scan for the end of a JSON value, `Trimmer` (whitespace around
boundaries in a text stream) and `partial_suffix` (text that may be the start of a marker)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, NoReturn

from mistralrs.parsed_calls import calls_from_json, strict_loads


class NeedMore(Exception):
    """The text so far does not decide it: wait for more (never raised once final)."""


class Reject(Exception):
    """Not a tool call: the text is plain content."""


# A JSON string (closed, or running to the end of the text) or a bracket; and the rest of a
# string whose opening quote was already scanned. Group 1: the closing quote; group 2: a
# lone backslash at the very end (its escaped character has not arrived yet).
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*(?:(")|(\\)?\Z)|[\[\]{}]', re.S)
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*(?:(")|(\\)?\Z)', re.S)
_NAME = re.compile(r"[\w.:\-]+")
SPACES = re.compile(r"\s*")


def _json_end(text: str, start: int, memo: dict[int, Any] | None = None, offset: int = 0) -> int | None:
    """End of the JSON object/array starting at text[start], None if the text ends first.
    Raises Reject when the brackets cannot be JSON.

    With `memo` (a dict owned by one stream, keyed by absolute position; `offset` is the
    absolute position of text[0]) an unfinished scan resumes where it stopped, so holding a
    long candidate back costs linear, not quadratic, time."""
    key = offset + start
    state = memo.get(key) if memo is not None else None
    if state is None:
        if text[start] == "{":
            m = SPACES.match(text, start + 1)
            assert m is not None  # \s* always matches
            nxt = text[m.end():m.end() + 1]
            if nxt and nxt not in '"}':
                raise Reject
        pos, stack, in_string = start, [], False
    else:
        pos, stack, in_string = state[0] - offset, list(state[1]), state[2]
    if in_string:
        m = _STRING_REST.match(text, pos)
        assert m is not None  # always matches: up to a closing quote or the end of the text
        if m.group(1) is None:
            pos = m.end() - (1 if m.group(2) else 0)
            if memo is not None:
                memo[key] = (offset + pos, stack, True)
            return None
        pos = m.end()
    for m in _JSON_TOKEN.finditer(text, pos):
        ch = m.group()[0]
        if ch == '"':
            if m.group(1) is None:
                if memo is not None:
                    memo[key] = (offset + m.end() - (1 if m.group(2) else 0), stack, True)
                return None
            continue
        if ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif not stack or stack.pop() != ch:
            raise Reject
        elif not stack:
            if memo is not None:
                memo.pop(key, None)
            return m.end()
    if memo is not None:
        memo[key] = (offset + len(text), stack, False)
    return None


class Cursor:
    """A position in the not-yet-decided text, with matching helpers that raise `NeedMore`
    when the text ends before they can decide (unless `final`, the end of generation,
    where they raise `Reject` instead) and `Reject` when the text cannot match.

    A decision made on a prefix is therefore the one that would be made on the whole
    output, which is what makes streaming and one-shot parsing agree."""

    __slots__ = ("final", "memo", "offset", "pos", "text")

    def __init__(
        self, text: str, pos: int = 0, final: bool = False, *, memo: dict[int, Any] | None = None, offset: int = 0
    ) -> None:
        self.text = text
        self.pos = pos
        self.final = final
        self.memo = memo  # scan state of unfinished JSON, see _json_end
        self.offset = offset  # absolute position of text[0] in the output

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def more(self) -> NoReturn:
        """The text ended before a decision: wait, or (final) give up."""
        raise Reject if self.final else NeedMore

    def ws(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n and text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        if self.at_end():
            self.more()
        return self.text[self.pos]

    def match(self, literal: str) -> bool:
        """Consume `literal` if it comes next; False if something else does."""
        rest = self.text[self.pos:self.pos + len(literal)]
        if rest == literal:
            self.pos += len(literal)
            return True
        if len(rest) < len(literal) and literal.startswith(rest) and not self.final:
            raise NeedMore
        return False

    def expect(self, literal: str) -> None:
        if not self.match(literal):
            raise Reject

    def expect_end(self) -> None:
        """Only the end of the output may come here."""
        if not self.at_end():
            raise Reject
        if not self.final:
            raise NeedMore

    def name(self) -> str:
        """A function name: word characters, ``.``, ``:`` and ``-``."""
        m = _NAME.match(self.text, self.pos)
        end = m.end() if m else self.pos
        if end == len(self.text) and not self.final:
            raise NeedMore
        if end == self.pos:
            raise Reject
        assert m is not None  # no match leaves end == self.pos, rejected above
        self.pos = end
        return self.text[m.start():end]

    def json(self) -> Any:
        """A JSON object or array, decoded."""
        ch = self.peek()
        if ch not in "{[":
            raise Reject
        end = _json_end(self.text, self.pos, self.memo, self.offset)
        if end is None:
            self.more()
        try:
            value = strict_loads(self.text[self.pos:end])
        except ValueError:
            raise Reject from None
        self.pos = end
        return value

    def json_calls(self, *, require_arguments: bool) -> list[tuple[str, str]]:
        """One JSON call (or list of calls), then any more separated by ``;`` (Llama 3)."""
        calls = calls_from_json(self.json(), require_arguments=require_arguments)
        if calls is None:
            raise Reject
        while True:
            save = self.pos
            self.ws()
            if not self.match(";"):
                self.pos = save
                return calls
            self.ws()
            if self.final and self.at_end():
                return calls
            more = calls_from_json(self.json(), require_arguments=require_arguments)
            if more is None:
                raise Reject
            calls.extend(more)

    def json_calls_until(self, close: str, *, require_arguments: bool) -> list[tuple[str, str]]:
        """JSON calls, then `close` -- which may be missing at the very end of the output."""
        self.ws()
        calls = self.json_calls(require_arguments=require_arguments)
        self.ws()
        if not self.match(close):
            self.expect_end()
        return calls

    def arguments(self) -> str:
        """A JSON object of arguments, as a normalised string."""
        value = self.json()
        if not isinstance(value, dict):
            raise Reject
        return json.dumps(value, ensure_ascii=False)


class Trimmer:
    """Drops the whitespace that touches a boundary (a tool call, a reasoning tag) from a
    text stream: all of it before a boundary and at the very end, and after a boundary
    while nothing has been emitted yet. Between two pieces of text separated by a boundary
    the whitespace that follows the boundary is kept (or, with `joiner`, replaced by it),
    so words are never glued together. Trailing whitespace is held back until it is known
    whether a boundary follows it. A stream without boundaries passes unchanged."""

    __slots__ = ("emitted", "joiner", "pending", "touching")

    def __init__(self, *, touching: bool = False, joiner: str | None = None) -> None:
        self.pending = ""
        self.touching = touching
        self.emitted = False
        self.joiner = joiner

    def text(self, s: str) -> str:
        if not s:
            return ""
        if self.touching:
            if not self.emitted:
                s = s.lstrip()
            elif self.joiner is not None:
                s = s.lstrip()
                if s:
                    s = self.joiner + s
        s = self.pending + s
        body = s.rstrip()
        self.pending = s[len(body):]
        if body:
            self.emitted = True
            self.touching = False
        return body

    def boundary(self) -> None:
        self.pending = ""
        self.touching = True

    def flush(self) -> str:
        out = "" if self.touching else self.pending
        self.pending = ""
        return out


def partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best

