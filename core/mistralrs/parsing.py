"""Tool-call and reasoning parsers: turn a model's generated text into OpenAI fields.

Two kinds of parser, both pure text processing and both streaming-capable, one instance
per sequence:

- `ToolCallParser` splits the output into plain ``content`` and ``tool_calls``
  (`ToolCall` = id, function name, arguments as a JSON *string*, the OpenAI shape).
- `ReasoningParser` splits ``reasoning_content`` (``<think>...</think>`` and the like) from
  the answer ``content``.

Parsers are plugins (`register_tool_parsers` / `register_reasoning_parsers`, specs
`ToolCallParserSpec` / `ReasoningParserSpec`); `select_tool_parser` and
`select_reasoning_parser` pick one for a model. In a pipeline the reasoning parser runs
first, and its *content* stream feeds the tool-call parser (tool calls are never looked
for inside reasoning).

Streaming contract (what the tests check for every parser and every way of splitting an
output into deltas): the content deltas returned by `feed`/`finish` concatenate to
``parse(text).content``, and the tool-call deltas merged by index (`merge_tool_call_deltas`)
equal ``parse(text).tool_calls`` (up to the generated ids). Text that may be the start of a
tool call is held back until it is decided, then released as content if it was not one.
Malformed tool-call syntax is never an error: it stays in the content, verbatim.

Writing a tool-call parser: subclass `ToolCallParser`, list the texts that open a call in
`start_markers`, and implement `parse_region(marker, cursor)` with the `Cursor` helpers;
the base class does buffering, holding back, whitespace and deltas. (A parser may instead
override `feed`/`finish`/`parse` wholesale; those three methods are the contract.)
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterable
from typing import Any, NoReturn

import attrs

from mistralrs import json_input
from mistralrs.errors import NoCandidateError
from mistralrs.specs import ReasoningParserSpec, ToolCallParserSpec, resolve

__all__ = [
    "FALLBACK_TOOL_PARSER",
    "Cursor",
    "NeedMore",
    "ParsedOutput",
    "ReasoningParser",
    "Reject",
    "TagReasoningParser",
    "TemplateMarkers",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "calls_from_json",
    "make_reasoning_parser",
    "make_tool_parser",
    "merge_tool_call_deltas",
    "new_tool_call_id",
    "normalize_arguments",
    "select_reasoning_parser",
    "select_tool_parser",
]

# The generic parser used when nothing more specific matches a model.
FALLBACK_TOOL_PARSER = "json"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------
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


def _loads(text: str) -> Any:
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
            value = _loads(text)
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


# --------------------------------------------------------------------------------------
# Incremental parsing toolkit
# --------------------------------------------------------------------------------------
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
_SPACES = re.compile(r"\s*")


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
            m = _SPACES.match(text, start + 1)
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
            value = _loads(self.text[self.pos:end])
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

    def arguments(self) -> str:
        """A JSON object of arguments, as a normalised string."""
        value = self.json()
        if not isinstance(value, dict):
            raise Reject
        return json.dumps(value, ensure_ascii=False)


class _Trimmer:
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


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


# --------------------------------------------------------------------------------------
# Tool-call parsers
# --------------------------------------------------------------------------------------
class ToolCallParser:
    """Base class and framework for tool-call parsers. One instance per sequence.

    Subclasses set `start_markers` (texts that open a tool-call region anywhere in the
    output, e.g. ``"<tool_call>"``) and implement `parse_region`. With
    `bare_json_at_start` (the default), an output that *starts* with a JSON call
    (``{"name": ..., "arguments": {...}}``, a list of them, or either in a ```json fence) is
    a call too: models often drop their markers, and servers may strip special tokens.

    Whitespace before a call, and whitespace that would begin or end the content, is
    dropped (so an output that is only calls has content ``""``, and ``"Let me check.\\n\\n"``
    before a call gives ``"Let me check."``); an output without calls comes back as content
    unchanged.
    """

    name: str = "base"
    start_markers: tuple[str, ...] = ()
    bare_json_at_start: bool = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._buf = ""
        self._base = 0
        self._memo: dict[int, Any] = {}
        self._at_start = True
        self._trim = _Trimmer()
        self._index = 0

    # -- the contract --------------------------------------------------------------------
    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """Streaming: take the next piece of text; return the content safe to emit now and
        the tool-call deltas completed by it."""
        self._buf += delta
        return self._process(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of generation: decide everything still held back."""
        return self._process(final=True)

    def parse(self, text: str) -> ParsedOutput:
        """The whole output at once (does not disturb this instance's streaming state)."""
        clone = copy.copy(self)
        clone.reset()
        content, deltas = clone.feed(text)
        tail, more = clone.finish()
        return ParsedOutput(content + tail, merge_tool_call_deltas(deltas + more))

    def render_call(self, name: str, arguments: str) -> str:
        """The text this family's models write for one call (`arguments` a JSON object
        string): for few-shot prompts, grammars that force a call, and round-trip tests.
        ``parse(render_call(n, a))`` gives back the call."""
        return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}'

    # -- what subclasses implement -------------------------------------------------------
    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        """Parse the calls after `marker` (the cursor is just past it); leave the cursor at
        the end of the region. Raise `Reject` if it is not a call, `NeedMore` (via the
        cursor helpers) if the text so far cannot tell."""
        raise Reject

    def parse_bare(self, cur: Cursor) -> list[tuple[str, str]]:
        """Calls written as bare JSON at the start of the output (cursor at the first
        non-space character): ``{...}``, ``[...]``, ``{...}; {...}``, or ```json fenced."""
        fenced = cur.match("```")
        if fenced:
            cur.match("json")
            cur.ws()
        calls = cur.json_calls(require_arguments=True)
        if fenced:
            cur.ws()
            if not cur.match("```"):
                cur.expect_end()
        return calls

    # -- the machinery -------------------------------------------------------------------
    def _process(self, *, final: bool) -> tuple[str, list[ToolCallDelta]]:
        items: list[Any] = []
        buf, base = self._buf, self._base  # base: position of buf[0] in the whole output

        def cursor(pos: int) -> Cursor:
            return Cursor(buf, pos, final, memo=self._memo, offset=base)

        while True:
            if self._at_start:
                spaces = _SPACES.match(buf)
                assert spaces is not None  # \s* always matches
                start = spaces.end()
                if start == len(buf) and not final:
                    break
                if self.bare_json_at_start and start < len(buf):
                    cur = cursor(start)
                    try:
                        calls = self.parse_bare(cur)
                    except NeedMore:
                        break
                    except Reject:
                        pass
                    else:
                        items.append(calls)
                        buf, base = buf[cur.pos:], base + cur.pos
                self._at_start = False
                continue
            found = self._find_marker(buf)
            if found is None:
                cut = len(buf) - (0 if final else _partial_suffix(buf, self.start_markers))
                items.append(buf[:cut])
                buf, base = buf[cut:], base + cut
                break
            pos, marker = found
            items.append(buf[:pos])
            cur = cursor(pos + len(marker))
            try:
                calls = self.parse_region(marker, cur)
            except NeedMore:
                buf, base = buf[pos:], base + pos
                break
            except Reject:
                items.append(marker)
                cut = pos + len(marker)
            else:
                items.append(calls)
                cut = cur.pos
            buf, base = buf[cut:], base + cut
            self._memo.clear()
        self._buf, self._base = buf, base
        return self._emit(items, final)

    def _find_marker(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for marker in self.start_markers:
            pos = buf.find(marker)
            if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(marker) > len(best[1]))):
                best = (pos, marker)
        return best

    def _emit(self, items: list[Any], final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        for item in items:
            if isinstance(item, str):
                content.append(self._trim.text(item))
                continue
            self._trim.boundary()
            for name, arguments in item:
                deltas.append(ToolCallDelta(self._index, new_tool_call_id(), name, arguments))
                self._index += 1
        if final:
            content.append(self._trim.flush())
        return "".join(content), deltas


# --------------------------------------------------------------------------------------
# Reasoning parsers
# --------------------------------------------------------------------------------------
class ReasoningParser:
    """Base class of reasoning parsers. One instance per sequence.

    `starts_in_reasoning=True` when the chat template already put the opening tag in the
    prompt (Qwen3-Thinking, DeepSeek-R1 style), so the output begins inside the reasoning.
    """

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self.starts_in_reasoning = starts_in_reasoning
        self.reset()

    def reset(self) -> None:
        pass

    def feed(self, delta: str) -> tuple[str, str]:
        """Streaming: return (reasoning delta, content delta) safe to emit now."""
        raise NotImplementedError

    def finish(self) -> tuple[str, str]:
        """End of generation: flush what is held back. An unclosed block is reasoning."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, str]:
        """The whole output: (reasoning_content or None if there is none, content).
        Does not disturb this instance's streaming state."""
        clone = copy.copy(self)
        clone.reset()
        r1, c1 = clone.feed(text)
        r2, c2 = clone.finish()
        reasoning = r1 + r2
        return (reasoning or None), c1 + c2

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        """Whether a rendered prompt ends inside an open reasoning block (so the parser
        should be built with ``starts_in_reasoning=True``)."""
        return False


class TagReasoningParser(ReasoningParser):
    """Reasoning between an open and a close tag (``<think>`` / ``</think>`` by default).

    Text before the open tag and after the close tag is content; several blocks are joined
    with a newline; an unclosed block at the end is reasoning. Whitespace just inside the
    tags is dropped, and so is whitespace outside them that would begin or end the
    content (``<think>...</think>\\n\\nAnswer`` gives ``Answer``). When starting in
    reasoning, a repeated open tag at the very start of the output is dropped.
    """

    open_tag: str = "<think>"
    close_tag: str = "</think>"

    def reset(self) -> None:
        self._buf = ""
        self._in = self.starts_in_reasoning
        self._maybe_open = self.starts_in_reasoning
        self._reasoning = _Trimmer(touching=self.starts_in_reasoning, joiner="\n")
        self._content = _Trimmer()

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._process(final=False)

    def finish(self) -> tuple[str, str]:
        return self._process(final=True)

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        opened = prompt.rfind(cls.open_tag)
        return opened >= 0 and opened > prompt.rfind(cls.close_tag)

    def _process(self, *, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._buf
        while True:
            if self._in:
                if self._maybe_open:
                    stripped = buf.lstrip()
                    if stripped.startswith(self.open_tag):
                        buf = stripped[len(self.open_tag):]
                        self._maybe_open = False
                        continue
                    if self.open_tag.startswith(stripped) and not final:
                        break
                    self._maybe_open = False
                end = buf.find(self.close_tag)
                if end < 0:
                    keep = 0 if final else _partial_suffix(buf, (self.close_tag,))
                    reasoning.append(self._reasoning.text(buf[:len(buf) - keep]))
                    buf = buf[len(buf) - keep:]
                    break
                reasoning.append(self._reasoning.text(buf[:end]))
                self._reasoning.boundary()
                self._content.boundary()
                buf = buf[end + len(self.close_tag):]
                self._in = False
            else:
                start = buf.find(self.open_tag)
                if start < 0:
                    keep = 0 if final else _partial_suffix(buf, (self.open_tag,))
                    content.append(self._content.text(buf[:len(buf) - keep]))
                    buf = buf[len(buf) - keep:]
                    break
                content.append(self._content.text(buf[:start]))
                self._content.boundary()
                self._reasoning.boundary()
                buf = buf[start + len(self.open_tag):]
                self._in = True
        self._buf = buf
        if final:
            if self._in:
                self._reasoning.boundary()
            reasoning.append(self._reasoning.flush())
            content.append(self._content.flush())
        return "".join(reasoning), "".join(content)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------
@attrs.frozen
class TemplateMarkers:
    """A `supports` predicate for parser specs: true when the model's chat template text
    contains any of `markers` (all of them with ``require_all=True``)."""

    markers: tuple[str, ...] = attrs.field(converter=tuple)
    require_all: bool = False

    def __call__(self, chat_template: str | None = None, **_: Any) -> bool:
        if not chat_template:
            return False
        test = all if self.require_all else any
        return test(m in chat_template for m in self.markers)


def _best(specs: Iterable[Any]) -> Any:
    found = sorted(specs, key=lambda s: (-s.priority, s.name))
    return found[0] if found else None


def _select(catalogue: Any, model_type: str | None, chat_template: str | None) -> Any:
    if chat_template:
        spec = _best(
            s for s in catalogue
            if s.supports is not None and s.is_supported(chat_template=chat_template, model_type=model_type)
        )
        if spec is not None:
            return spec
    if model_type:
        wanted = model_type.lower()
        spec = _best(s for s in catalogue if wanted in (m.lower() for m in s.model_types))
        if spec is not None:
            return spec
    return None


def select_tool_parser(
    registry: Any,
    *,
    model_type: str | None,
    chat_template: str | None,
    override: str | None = None,
) -> ToolCallParserSpec:
    """The tool-call parser for a model.

    1. `override` (``--tool-parser NAME``) by name;
    2. else a parser whose `supports` predicate (usually `TemplateMarkers`) recognises the
       chat template text, e.g. ``<tool_call>`` -> hermes, ``[TOOL_CALLS]`` -> mistral: the
       template is what the model was trained to write, more specific than its
       architecture (Hermes-2-Pro-Mistral is ``model_type: mistral``);
    3. else a parser listing `model_type` in its `model_types`;
    4. else the generic JSON fallback (`FALLBACK_TOOL_PARSER`).
    Ties go to the higher priority, then the name."""
    catalogue = registry.tool_parsers
    if override:
        return catalogue.get(override)
    spec = _select(catalogue, model_type, chat_template)
    if spec is not None:
        return spec
    if FALLBACK_TOOL_PARSER in catalogue:
        return catalogue.get(FALLBACK_TOOL_PARSER)
    raise NoCandidateError(
        f"no tool-call parser for model_type={model_type!r} and no {FALLBACK_TOOL_PARSER!r} fallback; "
        f"registered: {', '.join(catalogue.names()) or 'none'}"
    )


def select_reasoning_parser(
    registry: Any,
    *,
    model_type: str | None,
    chat_template: str | None,
    override: str | None = None,
) -> ReasoningParserSpec | None:
    """The reasoning parser for a model, or None if it does not reason. Same order as
    `select_tool_parser` (override, template, model_type) without a fallback; the override
    ``"none"`` turns reasoning parsing off."""
    catalogue = registry.reasoning_parsers
    if override:
        if override.lower() in ("none", "off"):
            return None
        return catalogue.get(override)
    return _select(catalogue, model_type, chat_template)


def make_tool_parser(spec: ToolCallParserSpec) -> ToolCallParser:
    """A fresh parser instance (one per sequence) from a spec."""
    return resolve(spec.parser)()


def make_reasoning_parser(spec: ReasoningParserSpec, *, starts_in_reasoning: bool = False) -> ReasoningParser:
    """A fresh reasoning parser instance (one per sequence) from a spec."""
    return resolve(spec.parser)(starts_in_reasoning=starts_in_reasoning)
