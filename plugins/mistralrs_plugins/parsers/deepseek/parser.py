"""Implementation of the DeepSeek tool-call parser (registered in `__init__.py`).

Formats (``｜`` is U+FF5C, ``▁`` is U+2581, as in DeepSeek's tokenizer):
- V3 / R1::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": "value"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

- V3.1: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"arg": "value"}<｜tool▁call▁end｜>``.

A block's calls are emitted together when the block closes (at ``<｜tool▁calls▁end｜>``,
or the end of the output). A lone ``<｜tool▁call▁begin｜>`` without the outer marker is
accepted too.
"""

from __future__ import annotations

from mistralrs.parsing import Cursor, Reject, ToolCallParser

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"


class DeepSeekToolParser(ToolCallParser):
    name = "deepseek"
    start_markers = (CALLS_BEGIN, CALL_BEGIN)

    def render_call(self, name: str, arguments: str) -> str:
        return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}{CALLS_END}"

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        if marker == CALL_BEGIN:
            calls = [self._call(cur)]
            save = cur.pos
            cur.ws()
            if not cur.match(CALLS_END):
                cur.pos = save
            return calls
        calls = []
        while True:
            cur.ws()
            if calls and cur.match(CALLS_END):
                return calls
            if calls and cur.final and cur.at_end():
                return calls
            cur.expect(CALL_BEGIN)
            calls.append(self._call(cur))

    def _call(self, cur: Cursor) -> tuple[str, str]:
        kind = cur.name()
        cur.expect(SEP)
        if kind == "function" and cur.peek() != "{":
            # V3: the type, then the name on its own line, then fenced JSON.
            name = cur.name()
            cur.ws()
            cur.expect("```")
            cur.match("json")
            cur.ws()
            arguments = cur.arguments()
            cur.ws()
            cur.expect("```")
        else:
            # V3.1: the name, then the JSON arguments.
            name = kind
            cur.ws()
            arguments = cur.arguments()
        cur.ws()
        if not cur.match(CALL_END):
            cur.expect_end()
        if not name:
            raise Reject
        return name, arguments
