"""An Anthropic Messages request as the chat-completions body it means: `system` and the
content blocks of `messages` (text, image, tool_use, tool_result, thinking) as chat messages,
`tools` / `tool_choice` in the chat form, `stop_sequences`, `thinking` and the sampling fields.
Every bad field is a 400 naming it (`param`), as the chat route's are."""

from __future__ import annotations

from typing import Any, Mapping

from mistralrs_plugins.frontends.openai_server.common import ApiError, dumps

# Fields passed to the chat request as they are: Anthropic's sampling fields and mistral.rs's
# extensions of the Messages API.
PASSTHROUGH = (
    "model", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "seed", "ignore_eos", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_sequence_breakers", "truncate_sequence", "enable_thinking", "reasoning_effort", "chat_template_kwargs",
    "max_tool_rounds", "response_format", "grammar", "web_search_options",
)
SEARCH_TOOL_PREFIX = "web_search_"  # Anthropic's server tool `web_search_20250305`: our web search


def _fail(message: str, param: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _text_blocks(content: Any, where: str, param: str) -> str:
    """A string, or text blocks joined (what `system` and `tool_result.content` may be)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(f"{where} must be a string or a list of text blocks", param)
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "image":
            _image(block, f"{where}[{j}]", param)
            raise _fail(f"{where}[{j}] is an image; images go in user messages", param)
        if kind != "text" or not isinstance(block.get("text"), str):
            raise _fail(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}}), got "
                        f"type {kind!r}", param)
        texts.append(block["text"])
    return "\n".join(texts)


def _image(block: Mapping[str, Any], where: str, param: str) -> str:
    """An image block's source as a URL a vision model's chat request takes (base64 → data: URL);
    a text-only model then refuses the image part with a 400."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if kind == "base64":
        if not isinstance(source.get("data"), str) or not isinstance(source.get("media_type"), str):  # type: ignore[union-attr]
            raise _fail(f"{where}.source needs `media_type` and base64 `data`", param)
    elif kind == "url":
        if not isinstance(source.get("url"), str):  # type: ignore[union-attr]
            raise _fail(f"{where}.source needs a `url`", param)
    else:
        raise _fail(f"{where}.source.type must be \"base64\" or \"url\", got {kind!r}", param)
    if kind == "url":
        return str(source["url"])  # type: ignore[index]
    return f"data:{source['media_type']};base64,{source['data']}"  # type: ignore[index]


def _tool_result(block: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _fail(f"{where}.tool_use_id must be the id of a tool_use block", "messages")
    content = block.get("content", "")
    text = _text_blocks(content, f"{where}.content", "messages")
    if block.get("is_error") is True and not text.lower().startswith("error"):
        text = f"Error: {text}"
    message: dict[str, Any] = {"role": "tool", "tool_call_id": call_id, "content": text}
    if call_id in names:
        message["name"] = names[call_id]
    return message


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            name, call_id, args = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                raise _fail(f"{at} (tool_use) needs an `id` and a `name`", "messages")
            if not isinstance(args, Mapping):
                raise _fail(f"{at}.input must be an object", "messages")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": dict(args)}})
        else:
            raise _fail(f"{at} has type {kind!r}; assistant messages take text, thinking and tool_use blocks",
                        "messages")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def _user(blocks: list[Any], where: str, names: Mapping[str, str]) -> list[dict[str, Any]]:
    """A user turn: its tool results (as tool messages, first), then its text."""
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # text and image parts in order (only used when there are images)
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "tool_result":
            results.append(_tool_result(block, at, names))
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image(block, at, "messages")}})
        else:
            raise _fail(f"{at} has type {kind!r}; user messages take text, image and tool_result blocks",
                        "messages")
    if any(p["type"] == "image_url" for p in parts):
        return results + [{"role": "user", "content": parts}]
    return results + ([{"role": "user", "content": "\n".join(texts)}] if texts or not results else [])


def to_chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`system` + `messages` as chat messages."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _text_blocks(system, "system", "system")
        if text:
            out.append({"role": "system", "content": text})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages must be a non-empty list of {role, content} messages", "messages")
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool messages of the results
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _fail(f"{where} must be an object", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise _fail(f"{where}.role must be \"user\" or \"assistant\", got {role!r} (the system prompt is the "
                        "top-level `system` field)", "messages")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _fail(f"{where}.content must be a string or a list of content blocks", "messages")
        if role == "assistant":
            message = _assistant(content, where)
            for call in message.get("tool_calls", ()):
                names[call["id"]] = call["function"]["name"]
            out.append(message)
        else:
            out.extend(_user(content, where, names))
    return out


def to_chat_tools(value: Any) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """(function tools in the chat form, `web_search_options` for a web-search server tool)."""
    if value is None:
        return None, None
    if not isinstance(value, list):
        raise _fail("tools must be a list of tools", "tools")
    tools: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None
    for i, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise _fail(f"tools[{i}] must be an object", "tools")
        kind = tool.get("type") or "custom"
        if isinstance(kind, str) and kind.startswith(SEARCH_TOOL_PREFIX):
            search = {}
            domains = {k: tool[k] for k in ("allowed_domains", "blocked_domains") if tool.get(k) is not None}
            if domains:
                search["filters"] = domains
            continue
        if kind != "custom":
            raise _fail(f"tools[{i}] has type {kind!r}; only custom tools (name, description, input_schema) and "
                        "web search are supported", "tools", code="not_supported_yet")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _fail(f"tools[{i}] needs a `name`", "tools")
        if not isinstance(schema, Mapping):
            raise _fail(f"tools[{i}].input_schema must be a JSON schema object", "tools")
        fn: dict[str, Any] = {"name": name, "parameters": dict(schema)}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        tools.append({"type": "function", "function": fn})
    return tools or None, search


def to_chat_tool_choice(value: Any) -> Any:
    """`auto` / `any` (a call is required) / `tool` (that tool) / `none` in the chat form."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool":
        name = value.get("name")  # type: ignore[union-attr]
        if not isinstance(name, str) or not name:
            raise _fail('tool_choice {"type": "tool"} needs the tool\'s `name`', "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise _fail(f'tool_choice must be {{"type": "auto" | "any" | "tool" | "none"}}, got {value!r}', "tool_choice")


def _thinking(value: Any) -> bool | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind in ("enabled", "adaptive"):
        return True
    if kind == "disabled":
        return False
    raise _fail(f'thinking.type must be "enabled", "adaptive" or "disabled", got {kind!r}', "thinking")


def to_chat_body(body: Mapping[str, Any], *, count_only: bool = False) -> dict[str, Any]:
    """The chat-completions body an Anthropic Messages request means (`count_only`: the
    count_tokens body, which has no `max_tokens`)."""
    out: dict[str, Any] = {"messages": to_chat_messages(body)}
    for key in PASSTHROUGH:
        if body.get(key) is not None:
            out[key] = body[key]
    if not count_only:
        if "max_tokens" not in body:
            raise _fail("max_tokens is required", "max_tokens")
        out["max_tokens"] = body["max_tokens"]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _fail("stop_sequences must be a list of non-empty strings", "stop_sequences")
        out["stop"] = stops
    tools, search = to_chat_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    if search is not None:
        out.setdefault("web_search_options", search)
    choice = to_chat_tool_choice(body.get("tool_choice"))
    if choice is not None and (tools or choice != "auto"):
        out["tool_choice"] = choice
    thinking = _thinking(body.get("thinking"))
    if thinking is not None and "enable_thinking" not in out:
        out["enable_thinking"] = thinking
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        raise _fail("metadata must be an object", "metadata")
    return out


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as a `tool_use` block's `input` object."""
    from mistralrs import json_input

    try:
        value = json_input.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": arguments if value is None else dumps(value)}
