"""Implementation of the Mistral tool-call parser (registered in `__init__.py`).

Formats:
- v3 tokenizers (Mistral 7B v0.3, Mixtral 8x22B, Nemo):
  ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`` (a single object accepted too);
- v11+ tokenizers (Mistral Small 3.2, Magistral, Devstral):
  ``[TOOL_CALLS]f[ARGS]{...}`` repeated once per call, with an optional
  ``[CALL_ID]abc123def`` between the name and ``[ARGS]`` (ignored: ids are generated).
Text before ``[TOOL_CALLS]`` is content.
"""

from __future__ import annotations

from mistralrs.parsing import Cursor, ToolCallParser


class MistralToolParser(ToolCallParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"
    start_markers = (marker,)

    def render_call(self, name: str, arguments: str) -> str:
        return f"{self.marker}[{super().render_call(name, arguments)}]"

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        cur.ws()
        if cur.peek() in "[{":
            return cur.json_calls(require_arguments=False)
        name = cur.name()
        if cur.match("[CALL_ID]"):
            cur.name()
        cur.expect("[ARGS]")
        cur.ws()
        return [(name, cur.arguments())]
