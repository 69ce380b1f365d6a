"""GPT-OSS's Harmony format: the ``analysis`` channel is reasoning, the ``final`` channel the
answer. Registration only: the parser lives in `.parser`."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ReasoningParserSpec


@hookimpl
def register_reasoning_parsers(register):
    register(ReasoningParserSpec(
        name="harmony",
        parser="mistralrs_plugins.parsers.harmony.parser:HarmonyReasoningParser",
        model_types=("gpt_oss",),
        supports=TemplateMarkers(("<|channel|>",)),
        description="Harmony channels (GPT-OSS): analysis -> reasoning_content, final -> content",
    ))
