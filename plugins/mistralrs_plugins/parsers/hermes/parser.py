"""Implementation of the Hermes / Qwen tool-call parser (registered in `__init__.py`).

Format: any number of ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` blocks,
usually one per line, optionally after some text. The closing tag may be missing at the
very end of the output.
"""

from __future__ import annotations

from mistralrs.parsing import Cursor, ToolCallParser


class HermesToolParser(ToolCallParser):
    name = "hermes"
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    start_markers = (open_tag,)

    def render_call(self, name: str, arguments: str) -> str:
        return f"{self.open_tag}\n{super().render_call(name, arguments)}\n{self.close_tag}"

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        return cur.json_calls_until(self.close_tag, require_arguments=False)
