"""Mistral tool calls: ``[TOOL_CALLS][{...}]`` and ``[TOOL_CALLS]name[ARGS]{...}``."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="mistral",
        parser="mistralrs_plugins.parsers.mistral.parser:MistralToolParser",
        model_types=("mistral", "mixtral", "mistral3", "ministral", "ministral3", "pixtral"),
        supports=TemplateMarkers(("[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
        description="[TOOL_CALLS][{json}] and [TOOL_CALLS]name[ARGS]{json} (Mistral, Mixtral, Nemo, Small)",
    ))
