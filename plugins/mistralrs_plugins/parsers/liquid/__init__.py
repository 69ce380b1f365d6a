"""Liquid (LFM2 / LFM2.5) tool calls: ``<|tool_call_start|>[name(arg="value")]<|tool_call_end|>``."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="liquid",
        parser="mistralrs_plugins.parsers.liquid.parser:LiquidToolParser",
        model_types=("lfm2", "lfm2_moe"),
        supports=TemplateMarkers(("<|tool_call_start|>",)),
        description="<|tool_call_start|>[name(arg=value, ...)]<|tool_call_end|> (LFM2, LFM2.5)",
    ))
