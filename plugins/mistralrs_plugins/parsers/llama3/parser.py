"""Implementation of the Llama 3.1+ tool-call parser (registered in `__init__.py`).

Formats (the JSON call format of the Llama 3.1/3.2/3.3 model cards):
- the whole output is ``{"name": "f", "parameters": {...}}`` (``{"type": "function", ...}``
  and ``"arguments"`` accepted), or several separated by ``;``, or a JSON list of them;
- ``<|python_tag|>`` followed by the same (anywhere in the output; text before it is
  content). ``<|python_tag|>`` followed by something else (built-in tool code such as
  ``brave_search.call(query="...")``) stays content.
"""

from __future__ import annotations

import json

from mistralrs.parsing import Cursor, ToolCallParser


class Llama3ToolParser(ToolCallParser):
    name = "llama3"
    python_tag = "<|python_tag|>"
    start_markers = (python_tag,)

    def render_call(self, name: str, arguments: str) -> str:
        return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "parameters": {arguments}}}'

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        cur.ws()
        return cur.json_calls(require_arguments=False)
