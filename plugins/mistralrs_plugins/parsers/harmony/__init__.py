"""GPT-OSS's Harmony format: the ``analysis`` channel is reasoning, the ``final`` channel the
answer, ``commentary to=functions.NAME`` messages tool calls. Registration only: the parsers
live in `.parser` (channels) and `.tool_parser` (calls)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ReasoningParserSpec, ToolCallParserSpec


@hookimpl
def register_reasoning_parsers(register):
    register(ReasoningParserSpec(
        name="harmony",
        parser="mistralrs_plugins.parsers.harmony.parser:HarmonyReasoningParser",
        model_types=("gpt_oss",),
        supports=TemplateMarkers(("<|channel|>",)),
        description="Harmony channels (GPT-OSS): analysis -> reasoning_content, final -> content",
    ))


@hookimpl
def register_tool_parsers(register):
    register(ToolCallParserSpec(
        name="harmony",
        parser="mistralrs_plugins.parsers.harmony.tool_parser:HarmonyToolParser",
        model_types=("gpt_oss",),
        supports=TemplateMarkers(("<|channel|>",)),
        description="Harmony tool calls: <|channel|>commentary to=functions.NAME ...<|message|>{json}<|call|> (GPT-OSS)",
    ))
