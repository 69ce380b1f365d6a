"""``<think>...</think>`` reasoning (Qwen3, QwQ, DeepSeek-R1, SmolLM3, GLM-Z1/4.5)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.parsing import TemplateMarkers
from mistralrs.specs import ReasoningParserSpec


@hookimpl
def register_reasoning_parsers(register):
    register(ReasoningParserSpec(
        name="think",
        parser="mistralrs_plugins.parsers.think.parser:ThinkReasoningParser",
        model_types=("qwen3", "qwen3_moe", "deepseek_v3", "deepseek_r1", "smollm3", "glm4", "glm4_moe"),
        supports=TemplateMarkers(("</think>",)),
        description="<think>...</think> reasoning, incl. a template-prefilled <think>",
    ))
