"""The Responses API's request side: `input` items and `instructions` as chat messages, `text.format`
as a chat `response_format`, the chat-completions body a Responses request means, and the checks
of the fields only the Responses API has."""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from mistralrs_plugins.frontends.openai_server.common import ApiError, dumps, flag

# Request fields passed straight to the chat request (sampling and stops).
PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stop", "logit_bias", "seed", "ignore_eos", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_sequence_breakers", "truncate_sequence", "enable_thinking", "reasoning_effort",
    "tool_choice", "max_tool_rounds", "response_format", "grammar", "chat_template_kwargs", "n",
)
TEXT_PART_TYPES = ("input_text", "output_text", "text")


def _text_of(content: Any, where: str) -> Any:
    """A message's content: a string, or (with ``input_image`` parts, for vision models) the list
    of text and image parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") == "input_image" for p in content):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "input_image":
                parts.append({"type": "image_url", "image_url": {"url": part.get("image_url") or part.get("file_id")}})
            elif kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ApiError(400, f"{where}.content[{j}] has type {kind!r}; expected text or input_image parts",
                               param="input")
        return parts
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise ApiError(400, f"{where}.content[{j}] has type {kind!r}; this model takes text parts only "
                                f"({', '.join(TEXT_PART_TYPES)})", param="input")
    return "".join(texts) if len(texts) == 1 else " ".join(texts)


def input_to_messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages from a Responses `input` (string or list of items)."""
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "input must not be empty", param="input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a string or a non-empty list of input items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise ApiError(400, f"{where} must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role must be user, assistant, system or developer, got {role!r}",
                               param="input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str):
                raise ApiError(400, f"{where}.name must be a string", param="input")
            call = {"id": item.get("call_id") or item.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function", "function": {"name": name, "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        elif kind == "reasoning":
            continue
        else:
            raise ApiError(400, f"{where} has type {kind!r}, which is not supported yet", param="input",
                           code="not_supported_yet")
    return messages


SEARCH_TOOL_TYPES = ("web_search", "web_search_preview")


def _search_tool(value: Any) -> dict[str, Any] | None:
    """A hosted ``web_search`` / ``web_search_preview`` tool as Chat's ``web_search_options``."""
    found = [t for t in value or () if isinstance(t, Mapping) and t.get("type") in SEARCH_TOOL_TYPES]
    if len(found) > 1:
        raise ApiError(400, "give at most one web_search tool", param="tools")
    if not found:
        return None
    tool = found[0]
    if tool["type"] == "web_search_preview" and (tool.get("filters") or tool.get("return_token_budget")):
        raise ApiError(400, "web_search_preview does not take filters or return_token_budget; use web_search",
                       param="tools")
    return {k: v for k, v in tool.items() if k != "type"} | {"type": tool["type"]}


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ApiError(400, "tools must be a list", param="tools")
    out = []
    for i, tool in enumerate(value):
        if isinstance(tool, Mapping) and tool.get("type") in SEARCH_TOOL_TYPES:
            continue  # hosted web search: web_search_options (see `_search_tool`)
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise ApiError(400, f"tools[{i}] has type {kind!r}; only function tools are supported", param="tools")
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out or None


def text_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format` (None for plain text)."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, Mapping):
        raise ApiError(400, "text must be an object like {\"format\": {...}}", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if fmt.get("schema") is None:
            raise ApiError(400, 'text.format of type "json_schema" needs a "schema"', param="text.format")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                      if k in fmt}}
    raise ApiError(400, f"text.format.type must be \"text\", \"json_object\" or \"json_schema\", got {kind!r}",
                   param="text.format")


def chat_body(body: Mapping[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions body a Responses request means."""
    out: dict[str, Any] = {"messages": messages}
    for key in PASSTHROUGH:
        if body.get(key) is not None:
            out[key] = body[key]
    limit_key = next((k for k in ("max_output_tokens", "max_tokens", "max_completion_tokens")
                      if body.get(k) is not None), None)
    if limit_key is not None:
        value = body[limit_key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"{limit_key} must be a positive integer, got {value!r}", param=limit_key)
        out["max_tokens"] = value
    top = body.get("top_logprobs")
    if top is not None or body.get("logprobs"):
        out["logprobs"] = True
        if top is not None:
            out["top_logprobs"] = top
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    search = _search_tool(body.get("tools"))
    if search is not None:
        out["web_search_options"] = search
    fmt = text_format(body)
    if fmt is not None:
        if body.get("response_format") is not None or body.get("grammar") is not None:
            raise ApiError(400, "send text.format or response_format / grammar, not both", param="text.format")
        out["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort") is not None and "reasoning_effort" not in out:
        out["reasoning_effort"] = reasoning["effort"]
    return out


def validate_body(body: Mapping[str, Any]) -> None:
    text_format(body)
    if flag(body, "background"):
        raise ApiError(400, "background responses are not supported yet", param="background",
                       code="not_supported_yet")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "the Responses API returns one output; n must be 1", param="n")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "instructions must be a string", param="instructions")
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        raise ApiError(400, "metadata must be an object", param="metadata")

