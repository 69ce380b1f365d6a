"""Llama 3.1+ tool calls: a bare JSON call (or several, ``;``-separated), optionally after
``<|python_tag|>``."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="llama3",
        parser="mistralrs_plugins.parsers.llama3.parser:Llama3ToolParser",
        model_types=("llama",),
        supports=TemplateMarkers(("<|python_tag|>",)),
        description='{"name": ..., "parameters": {...}} JSON, <|python_tag|> (Llama 3.1+)',
    ))
