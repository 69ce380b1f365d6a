"""HunYuan tool calls: ``<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>``."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="hunyuan",
        parser="mistralrs_plugins.parsers.hunyuan.parser:HunyuanToolParser",
        model_types=("hunyuan_v1_dense", "hunyuan_v1_moe"),
        supports=TemplateMarkers(("<tool_calls>",)),
        description="<tool_calls>[{json}, ...]</tool_calls> (HunYuan)",
    ))
