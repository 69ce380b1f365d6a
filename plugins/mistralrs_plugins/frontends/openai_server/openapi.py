"""The OpenAPI 3.1 document of the server (`/openapi.json`) and a plain HTML page that lists
it (`/docs`, no JavaScript or CDN)."""

from __future__ import annotations

import html
from typing import Any

from mistralrs import __version__
from mistralrs.engine.sampling_params import FIELD_BOUNDS, LOGIT_BIAS_BOUNDS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": {"description": "Invalid request (the `param` names the bad field; `exceed_context_size_error` "
                           "adds `n_prompt_tokens` and `n_ctx`)", **_json(_ref("ErrorResponse"))},
    "401": {"description": "Missing or wrong API key (with --api-key)", **_json(_ref("ErrorResponse"))},
    "404": {"description": "Unknown model or route", **_json(_ref("ErrorResponse"))},
    "413": {"description": "Body over 50 MB", **_json(_ref("ErrorResponse"))},
    "500": {"description": "Generation failed", **_json(_ref("ErrorResponse"))},
    "503": {"description": "The model is loading, or the server is shutting down", **_json(_ref("ErrorResponse"))},
}

NUM = {"type": "number"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR = {"type": "string"}
NULLABLE_INT = {"type": ["integer", "null"]}

SAMPLING = {
    "model": {**STR, "default": "default", "description": "the served model id, or \"default\""},
    "max_tokens": {**NULLABLE_INT, "minimum": 1},
    "max_completion_tokens": {**NULLABLE_INT, "minimum": 1, "description": "alias of max_tokens"},
    "n": {**INT, "default": 1, "minimum": 1, "maximum": 128},
    "stop": {"oneOf": [STR, {"type": "array", "items": STR, "maxItems": 32}]},
    "stop_token_ids": {"type": "array", "items": INT},
    **{name: bounds.schema() for name, bounds in FIELD_BOUNDS.items() if name != "top_logprobs"},
    "dry_sequence_breakers": {"type": "array", "items": STR},
    "logit_bias": {"type": "object", "additionalProperties": LOGIT_BIAS_BOUNDS.schema(),
                   "propertyNames": {"pattern": "^[0-9]+$"},
                   "description": "token id (as a string key) -> bias"},
    "ignore_eos": {**BOOL, "default": False},
    "truncate_sequence": {**BOOL, "default": False,
                          "description": "keep the end of a prompt that does not fit instead of failing"},
    "stream": {**BOOL, "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": BOOL}},
    "response_format": {"type": "object", "description": "{\"type\": \"text\" | \"json_object\" | \"json_schema\", "
                                                         "\"json_schema\": {\"name\", \"schema\", \"strict\"}}: "
                                                         "the output follows the schema (see structured-output.md)"},
    "grammar": {"type": "object", "description": "mistral.rs extension: {\"type\": \"regex\" | \"json_schema\" | "
                                                 "\"lark\" | \"llguidance\", \"value\": ...}; not with response_format"},
}

MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"type": "string", "examples": ["system", "user", "assistant", "tool"]},
        "content": {"oneOf": [STR, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "properties": {"type": {"const": "text"}, "text": STR}}}]},
        "name": STR, "tool_calls": {"type": "array", "items": {"type": "object"}}, "tool_call_id": STR,
    },
}

SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": STR, "type": STR, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
            "n_prompt_tokens": INT, "n_ctx": INT}}},
    },
    "ChatCompletionRequest": {
        "type": "object", "required": ["messages"], "additionalProperties": True,
        "properties": {
            "messages": {"oneOf": [{"type": "array", "items": MESSAGE, "minItems": 1},
                                   {"type": "string", "description": "one user message"}]},
            **SAMPLING,
            "logprobs": {**BOOL, "default": False},
            "top_logprobs": FIELD_BOUNDS["top_logprobs"].schema(),
            "tools": {"type": "array", "items": {"type": "object"},
                      "description": "function tools: rendered into the chat template; calls come back in "
                                     "message.tool_calls (see tool-calling.md)"},
            "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}],
                            "description": "\"required\", a named function and strict functions are enforced "
                                           "with a grammar"},
            "max_tool_rounds": {**INT, "minimum": 0,
                                "description": "server-side tool calls before the answer is returned (more than "
                                               "256 is taken as 256)"},
            "enable_thinking": BOOL,
            "reasoning_effort": STR,
            "chat_template_kwargs": {"type": "object"},
        },
    },
    "CompletionRequest": {
        "type": "object", "required": ["prompt"], "additionalProperties": True,
        "properties": {
            "prompt": {"oneOf": [STR, {"type": "array", "items": INT}]},
            **SAMPLING,
            "logprobs": {**INT, "minimum": 0, "maximum": 20, "description": "number of top logprobs per token"},
            "echo": {**BOOL, "default": False},
            "suffix": STR,
            "best_of": {**INT, "minimum": 1},
        },
    },
    "ResponsesRequest": {
        "type": "object", "required": ["input"], "additionalProperties": True,
        "properties": {
            "model": SAMPLING["model"],
            "input": {"oneOf": [STR, {"type": "array", "items": {"type": "object", "description":
                "{type: message, role, content: string | [{type: input_text|output_text, text}]}, "
                "function_call, function_call_output"}}]},
            "instructions": STR,
            "previous_response_id": STR,
            "store": {**BOOL, "default": True},
            "stream": {**BOOL, "default": False},
            "max_output_tokens": {**NULLABLE_INT, "minimum": 1},
            "metadata": {"type": "object"},
            "top_logprobs": FIELD_BOUNDS["top_logprobs"].schema(),
            **{k: SAMPLING[k] for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                        "frequency_penalty", "repetition_penalty", "stop", "seed", "logit_bias")},
        },
    },
    "ChatCompletion": {"type": "object", "properties": {
        "id": STR, "object": {"const": "chat.completion"}, "created": INT, "model": STR,
        "system_fingerprint": STR, "choices": {"type": "array", "items": {"type": "object"}},
        "usage": _ref("Usage")}},
    "Completion": {"type": "object", "properties": {
        "id": STR, "object": {"const": "text_completion"}, "created": INT, "model": STR,
        "choices": {"type": "array", "items": {"type": "object"}}, "usage": _ref("Usage")}},
    "Response": {"type": "object", "properties": {
        "id": STR, "object": {"const": "response"}, "created_at": INT,
        "status": {"enum": ["in_progress", "completed", "incomplete", "failed", "cancelled"]},
        "model": STR, "output": {"type": "array", "items": {"type": "object"}}, "previous_response_id": STR,
        "usage": {"type": "object"}}},
    "Usage": {"type": "object", "properties": {
        "prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT,
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": INT}}}},
    "ModelList": {"type": "object", "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
    "Model": {"type": "object", "properties": {
        "id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR, "max_model_len": INT}},
    "TokenizeRequest": {"type": "object", "properties": {
        "model": STR, "prompt": STR, "content": {**STR, "description": "alias of prompt"},
        "messages": {"type": "array", "items": MESSAGE}, "add_special_tokens": BOOL,
        "add_generation_prompt": {**BOOL, "default": True}, "return_token_strs": BOOL}},
    "TokenizeResponse": {"type": "object", "properties": {
        "tokens": {"type": "array", "items": INT}, "count": INT, "max_model_len": INT,
        "token_strs": {"type": "array", "items": STR}}},
    "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
        "model": STR, "tokens": {"type": "array", "items": INT}, "skip_special_tokens": BOOL}},
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": STR, "content": STR}},
    "EmbeddingRequest": {"type": "object", "required": ["input"], "properties": {
        "model": STR,
        "input": {"description": "a string, a list of strings, a list of token ids or a list of such lists",
                  "oneOf": [STR, {"type": "array", "items": STR}, {"type": "array", "items": INT},
                            {"type": "array", "items": {"type": "array", "items": INT}}]},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
        "dimensions": {**INT, "description": "a leading slice of each embedding (Matryoshka-trained models only)"},
        "user": STR,
        "truncate_sequence": {**BOOL, "description": "cut token-id inputs longer than max_seq_length instead of "
                                                     "refusing them (text is always cut there, keeping the start)"},
        "prompt_name": {**STR, "description": "one of the model's sentence-transformers prompts, e.g. query"}}},
    "EmbeddingList": {"type": "object", "properties": {
        "object": {"const": "list"}, "model": STR,
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "object": {"const": "embedding"}, "index": INT,
            "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, STR]}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": INT, "total_tokens": INT}}}},
}

SSE = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events"}}}


def _post(summary: str, request: str, response: str, *, streams: bool = True, description: str = "") -> dict:
    ok: dict[str, Any] = {"description": "OK", "content": {"application/json": {"schema": _ref(response)}}}
    if streams:
        ok["content"].update(SSE)
    return {"post": {"summary": summary, "description": description, "requestBody": {"required": True,
                     **_json(_ref(request))}, "responses": {"200": ok, **ERRORS}}}


def openapi_document(state: Any = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (`state` adds the served model id to the description)."""
    model = getattr(state, "model_id", None)
    paths: dict[str, Any] = {
        "/health": {"get": {"summary": "Liveness: always `OK` (also while the model loads)",
                            "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": STR}}}}}},
        "/": {"get": {"summary": "Alias of /health", "responses": {"200": {"description": "OK"}}}},
        "/v1/models": {"get": {"summary": "List the served model (a \"default\" entry first)",
                               "responses": {"200": {"description": "OK", **_json(_ref("ModelList"))}, **ERRORS}}},
        "/v1/models/{model}": {"get": {
            "summary": "One model card",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": STR}],
            "responses": {"200": {"description": "OK", **_json(_ref("Model"))}, **ERRORS}}},
        "/v1/chat/completions": _post(
            "Chat completion (OpenAI)", "ChatCompletionRequest", "ChatCompletion",
            description="With stream=true: `data:` chunks (`chat.completion.chunk`), `: keep-alive` comments "
                        "while waiting, a usage chunk with stream_options.include_usage, then `data: [DONE]`."),
        "/v1/completions": _post("Text completion (OpenAI legacy)", "CompletionRequest", "Completion"),
        "/v1/embeddings": _post("Embeddings (OpenAI) from an embedding model", "EmbeddingRequest", "EmbeddingList",
                                streams=False),
        "/v1/responses": _post(
            "Create a response (OpenAI Responses / OpenResponses)", "ResponsesRequest", "Response",
            description="With stream=true: named events response.created, response.in_progress, "
                        "response.output_item.added, response.content_part.added, response.output_text.delta, "
                        "response.output_text.done, response.content_part.done, response.output_item.done, "
                        "then response.completed (or response.incomplete / response.failed)."),
        "/v1/responses/{response_id}": {
            "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": STR}],
            "get": {"summary": "A stored response",
                    "responses": {"200": {"description": "OK", **_json(_ref("Response"))}, **ERRORS}},
            "delete": {"summary": "Delete a stored response",
                       "responses": {"200": {"description": "Deleted", **_json({"type": "object", "properties": {
                           "id": STR, "object": {"const": "response.deleted"}, "deleted": BOOL}})}, **ERRORS}},
        },
        "/v1/responses/{response_id}/input_items": {"get": {
            "summary": "The input items of a stored response",
            "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": STR}],
            "responses": {"200": {"description": "OK"}, **ERRORS}}},
        "/tokenize": _post("Tokenize a prompt or chat messages", "TokenizeRequest", "TokenizeResponse",
                           streams=False),
        "/detokenize": _post("Token ids back to text", "DetokenizeRequest", "DetokenizeResponse", streams=False),
        "/re_isq": {"post": {
            "summary": "Re-quantize the model in place (mistral.rs): between two engine steps, requests continue",
            "requestBody": {"required": True, **_json({"type": "object", "required": ["ggml_type"], "properties": {
                "ggml_type": {**STR, "description": "an ISQ type (Q4K, Q8_0, ...) or a bit count"}, "model": STR}})},
            "responses": {"200": {"description": "Done: `Re ISQ: \"Q4K\"`",
                                  "content": {"text/plain": {"schema": STR}}}, **ERRORS}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)",
                             "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": STR}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}},
        "/docs": {"get": {"summary": "A readable listing of this document",
                          "responses": {"200": {"description": "OK", "content": {"text/html": {"schema": STR}}}}}},
    }
    open_paths = {"/health", "/", "/openapi.json", "/docs"}
    for path, item in paths.items():
        if path in open_paths:
            for op in item.values():
                if isinstance(op, dict) and "responses" in op:
                    op["security"] = []
    desc = "OpenAI-compatible API of mistralrs."
    if model:
        desc += f" Serving `{model}`."
    return {
        "openapi": "3.1.0",
        "info": {"title": "mistralrs", "version": __version__, "description": desc},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server runs with --api-key"}},
        },
        "security": [{"bearer": []}],
    }


def _schema_rows(schema: dict[str, Any], doc: dict[str, Any]) -> str:
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    props = schema.get("properties") or {}
    if not props:
        return ""
    required = set(schema.get("required") or ())
    rows = []
    for name, spec in props.items():
        kind = spec.get("type") or ("one of" if "oneOf" in spec else spec.get("$ref", "").rsplit("/", 1)[-1])
        if isinstance(kind, list):
            kind = " | ".join(kind)
        notes = spec.get("description", "")
        if "default" in spec:
            notes = f"default {spec['default']!r}. {notes}".strip()
        rows.append(f"<tr><td><code>{html.escape(name)}</code>{' *' if name in required else ''}</td>"
                    f"<td>{html.escape(str(kind))}</td><td>{html.escape(notes)}</td></tr>")
    return "<table><tr><th>field</th><th>type</th><th>notes</th></tr>" + "".join(rows) + "</table>"


def docs_html(doc: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mistralrs API</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}",
        ".op{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:.8em 0}",
        ".m{display:inline-block;min-width:4em;font-weight:bold;text-transform:uppercase}",
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #eee;padding:2px 8px;text-align:left}",
        "code{background:#f4f4f4;padding:0 3px}</style></head><body>",
        f"<h1>{html.escape(doc['info']['title'])} {html.escape(doc['info']['version'])}</h1>",
        f"<p>{html.escape(doc['info']['description'])} The machine-readable document is at "
        "<a href='/openapi.json'>/openapi.json</a>.</p>",
    ]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters" or not isinstance(op, dict):
                continue
            parts.append(f"<div class='op'><span class='m'>{method}</span> <code>{html.escape(path)}</code> "
                         f"&mdash; {html.escape(op.get('summary', ''))}")
            if op.get("description"):
                parts.append(f"<p>{html.escape(op['description'])}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(_schema_rows(body, doc))
            codes = ", ".join(sorted(op.get("responses", {})))
            parts.append(f"<p>Responses: {html.escape(codes)}</p></div>")
    parts.append("</body></html>")
    return "".join(parts)
