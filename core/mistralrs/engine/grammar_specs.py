"""Structured output, request side: the `GrammarSpec` a request asks for, read from an HTTP body
(`grammar_from_request`: OpenAI `response_format` or mistral.rs's `grammar` field) or from the
Python API's `grammar` / `grammar_type` pair (`grammar_from_python`), and `ConstraintError`
for malformed fields. Pure Python: no torch, no llguidance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from mistralrs import json_input
from mistralrs.errors import InvalidRequest

GRAMMAR_KINDS: tuple[str, ...] = ("regex", "json_schema", "lark", "llguidance", "json_object")
"""Kinds a `GrammarSpec` may have. `json_object` is `response_format: {"type": "json_object"}`."""
_GRAMMAR_TYPES: tuple[str, ...] = ("regex", "json_schema", "lark", "llguidance")
"""Values of the `grammar.type` request field and of the Python API's `grammar_type`."""
_RESPONSE_FORMATS: tuple[str, ...] = ("text", "json_object", "json_schema")
_JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
KIND_LABELS = {
    "regex": "regex",
    "json_schema": "JSON schema",
    "json_object": "JSON schema",
    "lark": "Lark grammar",
    "llguidance": "llguidance grammar",
}


class ConstraintError(InvalidRequest):
    """An invalid structured-output request (bad `response_format` / `grammar`, a schema,
    regex or grammar that does not compile), or a constraint misused by the engine."""

    def __init__(self, message: str, param: str | None = "grammar", code: str | None = None):
        super().__init__(message, param=param, code=code)


def _canonical_value(kind: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    # Keep key order: JSON schema property order decides the generated field order.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


@attrs.frozen
class GrammarSpec:
    """What a request asks the output to match, before compilation.

    `value` is a str for "regex" and "lark", a JSON value (dict, or bool for a schema) for
    "json_schema", "json_object" and "llguidance". `param` is the request field it came from
    ("response_format" or "grammar"), used to name it in errors."""

    kind: str = attrs.field(validator=attrs.validators.in_(GRAMMAR_KINDS))
    value: Any = attrs.field(hash=False)
    param: str = "grammar"

    @property
    def key(self) -> tuple[str, str]:
        """Cache key: (kind, canonical text of the value). `json_object` shares the key of the
        equivalent `json_schema` so both use one compiled grammar."""
        kind = "json_schema" if self.kind == "json_object" else self.kind
        return (kind, _canonical_value(kind, self.value))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_json_text(text: str, what: str, param: str) -> Any:
    try:
        return json_input.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(
            f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); pass a JSON document",
            param=param,
        ) from None


def _schema_value(value: Any, what: str, param: str) -> Any:
    if isinstance(value, str):
        value = _parse_json_text(value, what, param)
    if isinstance(value, bool) or isinstance(value, Mapping):
        return value if isinstance(value, bool) else dict(value)
    raise ConstraintError(f"{what} must be a JSON object, got {_type_name(value)}", param=param)


def _llguidance_value(value: Any, what: str, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = _parse_json_text(value, what, param)
    if not isinstance(value, Mapping):
        raise ConstraintError(
            f'{what} must be a JSON object like {{"grammars": [...]}}, got {_type_name(value)}', param=param
        )
    if not isinstance(value.get("grammars"), list) or not value["grammars"]:
        raise ConstraintError(f'{what} needs a non-empty "grammars" list', param=param)
    return dict(value)


def _spec_for(kind: str, value: Any, *, param: str, what: str) -> GrammarSpec:
    if kind in ("regex", "lark"):
        if not isinstance(value, str):
            raise ConstraintError(f"{what} must be a string, got {_type_name(value)}", param=param)
        if kind == "lark" and not value.strip():
            raise ConstraintError(f"{what} is empty", param=param)
        return GrammarSpec(kind, value, param)
    if kind == "json_schema":
        return GrammarSpec(kind, _schema_value(value, what, param), param)
    if kind == "llguidance":
        return GrammarSpec(kind, _llguidance_value(value, what, param), param)
    raise AssertionError(kind)  # pragma: no cover


def grammar_from_request(body: Mapping[str, Any]) -> GrammarSpec | None:
    """The constraint an HTTP request body asks for (chat completions, completions), or None.

    * `response_format`: `{"type": "text"}` -> None; `{"type": "json_object"}` -> any JSON
      object; `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` -> the
      schema (`name`/`strict`/`description` are accepted and ignored: output always follows
      the schema strictly).
    * `grammar` [mistral.rs extension]: `{"type": "regex" | "json_schema" | "lark" |
      "llguidance", "value": ...}`.

    A null field is the same as an absent one. Both fields at once is an error, as upstream."""
    if not isinstance(body, Mapping):
        raise ConstraintError(f"request body must be a JSON object, got {_type_name(body)}", param=None)
    rf = body.get("response_format")
    grammar = body.get("grammar")
    if rf is not None and grammar is not None:
        raise ConstraintError(
            "`grammar` and `response_format` are mutually exclusive; send only one of them", param="grammar"
        )
    if grammar is not None:
        return _grammar_field(grammar)
    if rf is not None:
        return _response_format_field(rf)
    return None


def _grammar_field(grammar: Any) -> GrammarSpec:
    param = "grammar"
    if not isinstance(grammar, Mapping):
        raise ConstraintError(
            f'grammar must be an object {{"type": ..., "value": ...}}, got {_type_name(grammar)}', param=param
        )
    kind = grammar.get("type")
    if kind not in _GRAMMAR_TYPES:
        raise ConstraintError(
            f"grammar.type must be one of {', '.join(repr(k) for k in _GRAMMAR_TYPES)}, got {kind!r}", param=param
        )
    if "value" not in grammar or grammar["value"] is None:
        raise ConstraintError(f'grammar of type {kind!r} needs a "value"', param=param)
    return _spec_for(kind, grammar["value"], param=param, what=f"grammar.value ({KIND_LABELS[kind]})")


def _response_format_field(rf: Any) -> GrammarSpec | None:
    param = "response_format"
    if isinstance(rf, str):  # lenient: "json_object" / "text" as a bare string
        rf = {"type": rf}
    if not isinstance(rf, Mapping):
        raise ConstraintError(f'response_format must be an object {{"type": ...}}, got {_type_name(rf)}', param=param)
    kind = rf.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise ConstraintError(
            f"response_format.type must be one of {', '.join(repr(k) for k in _RESPONSE_FORMATS)}, got {kind!r}",
            param=param,
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", dict(_JSON_OBJECT_SCHEMA), param)
    js = rf.get("json_schema")
    if not isinstance(js, Mapping):
        raise ConstraintError(
            'response_format of type "json_schema" needs a "json_schema" object {"name": ..., "schema": {...}}',
            param=param,
        )
    name = js.get("name")
    if name is not None and not isinstance(name, str):
        raise ConstraintError(f"response_format.json_schema.name must be a string, got {_type_name(name)}", param=param)
    if js.get("schema") is None:
        raise ConstraintError('response_format.json_schema needs a "schema"', param=param)
    return _spec_for("json_schema", js["schema"], param=param, what="response_format.json_schema.schema")


def grammar_from_python(grammar: str | None, grammar_type: str | None) -> GrammarSpec | None:
    """The constraint of the Python API's `grammar` / `grammar_type` pair, or None.

    `grammar_type` is "regex", "lark", "json_schema" (grammar is the schema as JSON text) or
    "llguidance" (grammar is the JSON text of a `{"grammars": [...]}` object). Giving one
    without the other is an error, as in mistral.rs' Python bindings."""
    if grammar is None and grammar_type is None:
        return None
    if grammar is None:
        raise ConstraintError(f"grammar_type={grammar_type!r} is given but grammar is not", param="grammar")
    if grammar_type is None:
        raise ConstraintError(
            f"grammar is given but grammar_type is not; set it to one of {', '.join(repr(k) for k in _GRAMMAR_TYPES)}",
            param="grammar_type",
        )
    if grammar_type not in _GRAMMAR_TYPES:
        raise ConstraintError(
            f"grammar_type must be one of {', '.join(repr(k) for k in _GRAMMAR_TYPES)}, got {grammar_type!r}",
            param="grammar_type",
        )
    # (a dict passed for json_schema / llguidance is accepted as the parsed JSON)
    return _spec_for(grammar_type, grammar, param="grammar", what=f"grammar ({KIND_LABELS[grammar_type]})")

