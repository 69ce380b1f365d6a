"""Choosing and building a model's output parsers from the registry: `select_tool_parser` /
`select_reasoning_parser` (override, chat-template markers, model_type, fallback),
`TemplateMarkers` (the usual `supports` predicate) and `make_*_parser` (one per sequence)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from mistralrs.errors import NoCandidateError
from mistralrs.reasoning_parser import ReasoningParser
from mistralrs.specs import ReasoningParserSpec, ToolCallParserSpec, resolve
from mistralrs.tool_parser import ToolCallParser

# The generic parser used when nothing more specific matches a model.
FALLBACK_TOOL_PARSER = "json"


@attrs.frozen
class TemplateMarkers:
    """A `supports` predicate for parser specs: true when the model's chat template text
    contains any of `markers` (all of them with ``require_all=True``)."""

    markers: tuple[str, ...] = attrs.field(converter=tuple)
    require_all: bool = False

    def __call__(self, chat_template: str | None = None, **_: Any) -> bool:
        if not chat_template:
            return False
        test = all if self.require_all else any
        return test(m in chat_template for m in self.markers)


def _best(specs: Iterable[Any]) -> Any:
    found = sorted(specs, key=lambda s: (-s.priority, s.name))
    return found[0] if found else None


def _select(catalogue: Any, model_type: str | None, chat_template: str | None) -> Any:
    if chat_template:
        spec = _best(
            s for s in catalogue
            if s.supports is not None and s.is_supported(chat_template=chat_template, model_type=model_type)
        )
        if spec is not None:
            return spec
    if model_type:
        wanted = model_type.lower()
        spec = _best(s for s in catalogue if wanted in (m.lower() for m in s.model_types))
        if spec is not None:
            return spec
    return None


def select_tool_parser(
    registry: Any,
    *,
    model_type: str | None,
    chat_template: str | None,
    override: str | None = None,
) -> ToolCallParserSpec:
    """The tool-call parser for a model.

    1. `override` (``--tool-parser NAME``) by name;
    2. else a parser whose `supports` predicate (usually `TemplateMarkers`) recognises the
       chat template text, e.g. ``<tool_call>`` -> hermes, ``[TOOL_CALLS]`` -> mistral: the
       template is what the model was trained to write, more specific than its
       architecture (Hermes-2-Pro-Mistral is ``model_type: mistral``);
    3. else a parser listing `model_type` in its `model_types`;
    4. else the generic JSON fallback (`FALLBACK_TOOL_PARSER`).
    Ties go to the higher priority, then the name."""
    catalogue = registry.tool_parsers
    if override:
        return catalogue.get(override)
    spec = _select(catalogue, model_type, chat_template)
    if spec is not None:
        return spec
    if FALLBACK_TOOL_PARSER in catalogue:
        return catalogue.get(FALLBACK_TOOL_PARSER)
    raise NoCandidateError(
        f"no tool-call parser for model_type={model_type!r} and no {FALLBACK_TOOL_PARSER!r} fallback; "
        f"registered: {', '.join(catalogue.names()) or 'none'}"
    )


def select_reasoning_parser(
    registry: Any,
    *,
    model_type: str | None,
    chat_template: str | None,
    override: str | None = None,
) -> ReasoningParserSpec | None:
    """The reasoning parser for a model, or None if it does not reason. Same order as
    `select_tool_parser` (override, template, model_type) without a fallback; the override
    ``"none"`` turns reasoning parsing off."""
    catalogue = registry.reasoning_parsers
    if override:
        if override.lower() in ("none", "off"):
            return None
        return catalogue.get(override)
    return _select(catalogue, model_type, chat_template)


def make_tool_parser(spec: ToolCallParserSpec) -> ToolCallParser:
    """A fresh parser instance (one per sequence) from a spec."""
    return resolve(spec.parser)()


def make_reasoning_parser(spec: ReasoningParserSpec, *, starts_in_reasoning: bool = False) -> ReasoningParser:
    """A fresh reasoning parser instance (one per sequence) from a spec."""
    return resolve(spec.parser)(starts_in_reasoning=starts_in_reasoning)
