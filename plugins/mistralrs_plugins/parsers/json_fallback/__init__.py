"""The generic fallback tool-call parser (spec name ``json``): the output is a JSON call."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="json",
        parser="mistralrs_plugins.parsers.json_fallback.parser:JsonToolParser",
        priority=-100,
        description='generic: the output is {"name", "arguments"|"parameters"} JSON (or a list, or ```json fenced)',
    ))
