"""Implementation of the HunYuan tool-call parser (registered in `__init__.py`).

Format: ``<tool_calls>[{"name": "f", "arguments": {...}}, ...]</tool_calls>`` (a single object
accepted too), optionally after some text. The closing tag may be missing at the very end of
the output.
"""

from __future__ import annotations

from mistralrs.parsing import Cursor, ToolCallParser


class HunyuanToolParser(ToolCallParser):
    name = "hunyuan"
    open_tag = "<tool_calls>"
    close_tag = "</tool_calls>"
    start_markers = (open_tag,)

    def render_call(self, name: str, arguments: str) -> str:
        return f"{self.open_tag}[{super().render_call(name, arguments)}]{self.close_tag}"

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        return cur.json_calls_until(self.close_tag, require_arguments=False)
