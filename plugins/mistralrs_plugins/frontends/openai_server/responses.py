"""`/v1/responses`: OpenAI's Responses API (OpenResponses) over the chat machinery.

`input` (a string or a list of input items) and `instructions` become chat messages; with
`previous_response_id` the stored conversation of that response comes first (its
instructions do not carry over, as in OpenAI's API). Responses are kept in memory (LRU,
`store: false` opts out) for GET/DELETE and chaining.
"""

from __future__ import annotations

import collections
import time
import uuid
from typing import Any, Mapping

from aiohttp import web

from mistralrs import protocol as P
from mistralrs_plugins.frontends.openai_server.common import (
    ApiError,
    dumps,
    flag,
    read_json,
    reject_unsupported,
    sse_data,
    stream_error_payload,
)

# Request fields passed straight to the chat request (sampling and stops).
PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stop", "logit_bias", "seed", "ignore_eos", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_sequence_breakers", "truncate_sequence", "enable_thinking", "reasoning_effort",
)
TEXT_PART_TYPES = ("input_text", "output_text", "text")


class ResponseStore:
    """Stored responses, newest last; the oldest are forgotten past `capacity`."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def put(self, response_id: str, record: dict[str, Any]) -> None:
        self._items[response_id] = record
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> dict[str, Any] | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)


# -- input -> messages ------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
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


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ApiError(400, "tools must be a list", param="tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise ApiError(400, f"tools[{i}] has type {kind!r}; only function tools are supported", param="tools")
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out or None


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
    if tools and body.get("tool_choice") != "none":
        out["tools"] = tools
    return out


def _validate(body: Mapping[str, Any]) -> None:
    reject_unsupported(body)
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if fmt is not None and (not isinstance(fmt, Mapping) or fmt.get("type") != "text"):
            kind = fmt.get("type") if isinstance(fmt, Mapping) else fmt
            raise ApiError(400, f"text.format {kind!r} is not supported yet; only {{\"type\": \"text\"}}",
                           param="text.format", code="not_supported_yet")
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


# -- response objects ---------------------------------------------------------------------------
def _usage(u: Any) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _logprobs(tokenizer: Any, entries: list[Any]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        lp = P.logprobs_of(tokenizer, [entry]).content[0]
        out.append({
            "token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
            "top_logprobs": [
                {"token": (t := tokenizer.decode([top.token], skip_special_tokens=False)), "logprob": top.logprob,
                 "bytes": list(t.encode("utf-8"))}
                for top in lp.top_logprobs
            ],
        })
    return out


class ResponseBuilder:
    """One response's object, in its streaming states and final form."""

    def __init__(self, body: Mapping[str, Any], *, model: str, previous_id: str | None, gen: Any) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.previous_id = previous_id
        self.gen = gen
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    def part(self, done: bool) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text if done else "", "annotations": [],
                "logprobs": self.logprobs if done else []}

    def item(self, done: bool) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": "completed" if done else "in_progress",
                "role": "assistant", "content": [self.part(True)] if done else []}

    def obj(self) -> dict[str, Any]:
        finished = self.status in ("completed", "incomplete")
        sampling = self.gen.sampling
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": int(time.time()) if finished else None,
            "error": self.error, "incomplete_details": self.incomplete,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.gen.max_tokens, "model": self.model,
            "output": [self.item(True)] if finished else [],
            "parallel_tool_calls": True, "previous_response_id": self.previous_id,
            "reasoning": {"effort": None, "summary": None},
            "store": self.body.get("store", True) is not False,
            "temperature": getattr(sampling, "temperature", None), "top_p": getattr(sampling, "top_p", None),
            "text": {"format": {"type": "text"}}, "tool_choice": self.body.get("tool_choice", "auto"),
            "tools": self.body.get("tools") or [], "truncation": "disabled",
            "usage": self.usage, "user": self.body.get("user"), "metadata": self.body.get("metadata") or {},
            "output_text": self.text if finished else "",
        }

    def finish(self, done: Any) -> None:
        choice = done.choices[0]
        self.text = choice.text
        self.usage = _usage(done.usage)
        if choice.finish_reason == "length":
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
        elif choice.finish_reason == "canceled":
            self.status = "cancelled"
        else:
            self.status = "completed"

    def fail(self, exc: BaseException) -> None:
        err = stream_error_payload(exc)["error"]
        self.status = "failed"
        self.error = {"code": err.get("code") or "server_error", "message": err["message"]}


# -- handlers -----------------------------------------------------------------------------------
async def create_response(request: web.Request) -> web.StreamResponse:
    from mistralrs_plugins.frontends.openai_server.app import (
        ARRIVAL,
        STATE,
        build_request,
        collect_events,
        stream_events,
    )

    state = request.app[STATE]
    service = state.require_service()
    body = await read_json(request)
    state.check_model(body)
    _validate(body)
    stream = flag(body, "stream")
    prev_id = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if prev_id is not None:
        prev = state.responses.get(prev_id) if isinstance(prev_id, str) else None
        if prev is None:
            raise ApiError(400, f"previous response {prev_id!r} was not found (it may not have been stored, "
                                "or was deleted)", param="previous_response_id", code="previous_response_not_found")
        history = list(prev["conversation"])
    new_messages = input_to_messages(body.get("input"))
    system = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    gen = await build_request(request, P.build_chat_request, service, chat_body(body, system + history + new_messages))
    builder = ResponseBuilder(body, model=state.model_id, previous_id=prev_id, gen=gen)
    store = flag(body, "store", True)
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit(service, gen)

    def save() -> None:
        if store:
            conversation = history + new_messages + [{"role": "assistant", "content": builder.text}]
            input_items: Any = body.get("input") or []
            if isinstance(input_items, str):
                input_items = [{"type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": input_items}]}]
            items = [{"id": f"msg_{uuid.uuid4().hex}", **it} if isinstance(it, Mapping) and "id" not in it else it
                     for it in input_items]
            state.responses.put(builder.id, {"response": builder.obj(), "conversation": conversation,
                                             "input_items": items})

    if not stream:
        done, lps = await collect_events(state, handle, tracker)
        if gen.logprobs:
            builder.logprobs = _logprobs(service.tokenizer, lps.get(0, []))
        builder.finish(done)
        save()
        return web.json_response(builder.obj(), dumps=dumps)

    seq = 0
    lp_stream = P.ChatStream(service.tokenizer, id=builder.id, model=state.model_id, n=1, logprobs=gen.logprobs)

    def ev(kind: str, **data: Any) -> bytes:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **data}
        seq += 1
        return sse_data(payload, event=kind)

    item_ref = {"item_id": builder.message_id, "output_index": 0, "content_index": 0}
    head = [
        ev("response.created", response=builder.obj()),
        ev("response.in_progress", response=builder.obj()),
        ev("response.output_item.added", output_index=0, item=builder.item(False)),
        ev("response.content_part.added", **item_ref, part=builder.part(False)),
    ]

    def convert(event: Any) -> list[bytes]:
        name = type(event).__name__
        if name in ("TokenDelta", "ChoiceFinished"):
            text = event.text if name == "TokenDelta" else ""
            if name == "TokenDelta" and event.token_ids:
                tracker.token(event.index, len(event.token_ids))
            lps: list[dict[str, Any]] = []
            if gen.logprobs:
                chunk = lp_stream.chunk_for(event)
                entries = chunk.choices[0].logprobs.content if chunk is not None and chunk.choices[0].logprobs else []
                lps = [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                        "top_logprobs": [{"token": service.tokenizer.decode([t.token], skip_special_tokens=False),
                                          "logprob": t.logprob} for t in e.top_logprobs]} for e in entries]
                builder.logprobs.extend(lps)
            if not text and not lps:
                return []
            builder.text += text
            return [ev("response.output_text.delta", **item_ref, delta=text, logprobs=lps)]
        if name == "RequestDone":
            tracker.done(event)
            builder.finish(event)
            save()
            terminal = {"completed": "response.completed", "incomplete": "response.incomplete",
                        "cancelled": "response.cancelled"}.get(builder.status, "response.completed")
            return [
                ev("response.output_text.done", **item_ref, text=builder.text, logprobs=builder.logprobs),
                ev("response.content_part.done", **item_ref, part=builder.part(True)),
                ev("response.output_item.done", output_index=0, item=builder.item(True)),
                ev(terminal, response=builder.obj()),
            ]
        return []

    def on_error(exc: BaseException) -> list[bytes]:
        builder.fail(exc)
        err = stream_error_payload(exc)["error"]
        return [ev("error", code=err.get("code") or "server_error", message=err["message"], param=err.get("param")),
                ev("response.failed", response=builder.obj())]

    return await stream_events(request, state, handle, convert, head=head, done_line=False, on_error=on_error)


def _stored(request: web.Request) -> tuple[Any, dict[str, Any]]:
    from mistralrs_plugins.frontends.openai_server.app import STATE

    state = request.app[STATE]
    rid = request.match_info["response_id"]
    record = state.responses.get(rid)
    if record is None:
        raise ApiError(404, f"no stored response with id {rid!r}", param="response_id", code="response_not_found")
    return state, record


async def get_response(request: web.Request) -> web.Response:
    _, record = _stored(request)
    return web.json_response(record["response"], dumps=dumps)


async def delete_response(request: web.Request) -> web.Response:
    state, _ = _stored(request)
    rid = request.match_info["response_id"]
    state.responses.delete(rid)
    return web.json_response({"id": rid, "object": "response.deleted", "deleted": True}, dumps=dumps)


async def list_input_items(request: web.Request) -> web.Response:
    _, record = _stored(request)
    items = record["input_items"]
    return web.json_response({
        "object": "list", "data": items, "has_more": False,
        "first_id": items[0].get("id") if items else None, "last_id": items[-1].get("id") if items else None,
    }, dumps=dumps)
