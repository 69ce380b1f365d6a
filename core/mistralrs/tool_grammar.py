"""Grammars that force a tool call: a Lark grammar (llguidance dialect) over a tool-call parser's
own wire format (`ToolCallParser.render_call`) and the functions' JSON schemas, so the model
can only write a parseable call to a declared tool with schema-valid arguments."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs.errors import InvalidRequest

# JSON written inside a forced tool call: compact, with the separators models are trained on.
_CALL_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ARGS_SENTINEL = "\x00MISTRALRS_ARGUMENTS\x00"

# --------------------------------------------------------------------------------------
# Grammars that force a tool call
# --------------------------------------------------------------------------------------
def arguments_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema a forced call's arguments follow: the function's `parameters` (any
    object when absent). Keys the schema does not list are not allowed unless it says so
    (`additionalProperties`), as OpenAI's strict mode requires."""
    params = tool["function"].get("parameters")
    schema = dict(params) if params else {"type": "object"}
    if isinstance(schema.get("properties"), Mapping):
        schema.setdefault("additionalProperties", False)
    return schema


def _lark_literal(text: str, added: Mapping[str, int]) -> str:
    """`text` as a sequence of Lark terminals. Added tokens (``<tool_call>``, ``[TOOL_CALLS]``,
    ``<|python_tag|>`` ...) are referenced by id (``<[id]>``): llguidance matches added tokens
    only as tokens, never as the text they spell."""
    if not text:
        return ""
    markers = sorted((t for t in added if t and t in text), key=len, reverse=True)
    if not markers:
        return json.dumps(text, ensure_ascii=False)
    parts = re.split("(" + "|".join(re.escape(m) for m in markers) + ")", text)
    out = []
    for part in parts:
        if not part:
            continue
        out.append(f"<[{added[part]}]>" if part in added else json.dumps(part, ensure_ascii=False))
    return " ".join(out)


def split_render(parser: Any, name: str) -> tuple[str, str]:
    """(text before the arguments, text after them) of one call in the parser's format."""
    text = parser.render_call(name, _ARGS_SENTINEL)
    if text.count(_ARGS_SENTINEL) != 1:  # pragma: no cover - a parser that reshapes arguments
        text = json.dumps({"name": name, "arguments": None}).replace("null", _ARGS_SENTINEL)
    before, after = text.split(_ARGS_SENTINEL)
    return before, after


def _json_term(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _CALL_JSON_STYLE})


def added_tokens(tokenizer: Any) -> dict[str, int]:
    added = getattr(tokenizer, "added_tokens", None)
    return dict(added) if isinstance(added, Mapping) else {}


def tool_call_grammar(
    parser: Any,
    tools: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    forced: bool,
    strict_only: bool = False,
    reasoning_close: str | None = None,
) -> str:
    """A Lark grammar (llguidance dialect) over the parser family's call syntax.

    `forced`: the output is exactly one call to one of `tools`, its arguments following the
    tool's schema (`tool_choice` "required" or a named function). Otherwise (`auto` with
    strict functions): free text in which every call, once its start marker appears, is a
    well-formed call to a declared tool; with `strict_only` only strict functions have their
    arguments checked against their schema (the others take any JSON object).
    `reasoning_close`: the prompt left a reasoning block open; the model may reason freely
    until this close tag, then the grammar applies."""
    added = added_tokens(tokenizer)
    lines = ["%llguidance {}"]
    alternatives = []
    trigger: str | None = None
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        before, after = split_render(parser, name)
        strict = bool(tool["function"].get("strict")) or not strict_only
        schema = arguments_schema(tool) if strict else {"type": "object"}
        if not forced:
            stripped = before.lstrip()
            markers = tuple(getattr(parser, "start_markers", ()) or ())
            lead = next((m for m in markers if stripped.startswith(m)), None)
            if lead is not None:
                trigger, before = lead, stripped[len(lead):]
            elif markers:
                trigger, before = markers[0], "\n" + stripped
                if trigger.startswith("```"):
                    after = after + "\n```"
            else:
                raise InvalidRequest(f"the {parser.name!r} tool-call format has no start marker to enforce "
                                     "strict functions with; use tool_choice \"required\"", "tools")
        body = " ".join(p for p in (_lark_literal(before, added), _json_term(schema), _lark_literal(after, added)) if p)
        lines.append(f"call_{i}: {body}")
        alternatives.append(f"call_{i}")
    calls = " | ".join(alternatives)
    if forced:
        if reasoning_close:
            close = _lark_literal(reasoning_close, added)
            if reasoning_close in added:
                lines.insert(1, f"start: REASONING {close} \"\\n\\n\" ({calls})")
            else:
                lines.insert(1, f"start: reasoning \"\\n\\n\" ({calls})")
                lines.append(f"reasoning[lazy]: REASONING {close}")
            lines.append("REASONING: /(.|\\n)*/")
        else:
            lines.insert(1, f"start: {calls}")
        return "\n".join(lines)
    assert trigger is not None
    trig = _lark_literal(trigger, added)
    lines.insert(1, "start: tag* TEXT")
    if trigger in added:
        lines.append(f"tag: TEXT {trig} ({calls})")
    else:
        lines.append(f"tag_trigger[lazy]: TEXT {trig}")
        lines.append(f"tag: tag_trigger ({calls})")
    lines.append("TEXT: /(.|\\n)*/")
    return "\n".join(lines)


def is_special_token(tokenizer: Any, text: str) -> bool:
    """Whether `text` is an added token that is also special (detokenization would drop it)."""
    added = added_tokens(tokenizer)
    special = getattr(tokenizer, "special_ids", None) or frozenset()
    return text in added and added[text] in special

