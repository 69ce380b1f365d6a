"""`ToolCallParser`: the base class and incremental driver of tool-call parsers. It buffers the
output, holds back text that may open a call, runs the subclass's `parse_region` on it with a
`Cursor`, and turns the result into content and `ToolCallDelta`s (see `mistralrs.parsing`)."""

from __future__ import annotations

import copy
import json
from typing import Any

from mistralrs.parse_toolkit import SPACES, Cursor, NeedMore, Reject, Trimmer, partial_suffix
from mistralrs.parsed_calls import ParsedOutput, ToolCallDelta, merge_tool_call_deltas, new_tool_call_id


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
        self._trim = Trimmer()
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
                spaces = SPACES.match(buf)
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
                cut = len(buf) - (0 if final else partial_suffix(buf, self.start_markers))
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

