"""Implementation of the generic JSON tool-call parser (registered in `__init__.py`).

A call is ``{"name": "f", "arguments": {...}}`` (aliases ``function`` for the name and
``parameters`` for the arguments; arguments may be a JSON string; the nested OpenAI form
``{"type": "function", "function": {...}}`` too) or a list of them, written:
- at the start of the output, bare or in a ```json fence (text after it is content);
- or in a ```json fence anywhere in the output.
Objects with other keys (an ordinary JSON answer) are content.
"""

from __future__ import annotations

from mistralrs.parsing import Cursor, ToolCallParser


class JsonToolParser(ToolCallParser):
    name = "json"
    fence = "```json"
    start_markers = (fence,)

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        return cur.json_calls_until("```", require_arguments=True)
