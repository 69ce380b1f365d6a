"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ToolCallParserSpec


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="hermes",
        parser="mistralrs_plugins.parsers.hermes.parser:HermesToolParser",
        model_types=("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3"),
        supports=TemplateMarkers(("<tool_call>",)),
        description="<tool_call>{json}</tool_call> (Qwen 2/2.5/3, Hermes, SmolLM3)",
    ))
