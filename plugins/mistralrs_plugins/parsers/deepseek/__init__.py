"""DeepSeek V3 / V3.1 tool calls: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>...``."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="deepseek",
        parser="mistralrs_plugins.parsers.deepseek.parser:DeepSeekToolParser",
        model_types=("deepseek_v3", "deepseek_v2"),
        supports=TemplateMarkers(("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>")),
        description="<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME ```json{...}``` (DeepSeek V3/R1)",
    ))
