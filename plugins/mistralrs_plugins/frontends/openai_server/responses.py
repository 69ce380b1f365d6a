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
    sse_data,
    stream_error_payload,
)

# Request fields passed straight to the chat request (sampling and stops).
PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stop", "logit_bias", "seed", "ignore_eos", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_sequence_breakers", "truncate_sequence", "enable_thinking", "reasoning_effort",
    "tool_choice", "max_tool_rounds", "response_format", "grammar", "chat_template_kwargs", "n",
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
    fmt = text_format(body)
    if fmt is not None:
        if body.get("response_format") is not None or body.get("grammar") is not None:
            raise ApiError(400, "send text.format or response_format / grammar, not both", param="text.format")
        out["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort") is not None and "reasoning_effort" not in out:
        out["reasoning_effort"] = reasoning["effort"]
    return out


def _validate(body: Mapping[str, Any]) -> None:
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
    """One response's object, in its streaming states and final form.

    Output items, in the order the model produced them: a `reasoning` item (when the model
    reasons), the assistant `message` (its text; always present unless the output is only
    function calls) and one `function_call` item per tool call. For streaming, `reasoning`,
    `text`, `call` and `close` return the events of each step as (type, data) pairs."""

    def __init__(self, body: Mapping[str, Any], *, model: str, previous_id: str | None, gen: Any,
                 plan: Any = None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.previous_id = previous_id
        self.gen = gen
        self.plan = plan
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []  # {"kind", "id", ...} in output order
        self.calls: list[Any] = []
        self._open: dict[str, Any] | None = None
        self._separate = False
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    # -- items ---------------------------------------------------------------------------------
    def part(self, done: bool) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text if done else "", "annotations": [],
                "logprobs": self.logprobs if done else []}

    def item(self, done: bool) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": "completed" if done else "in_progress",
                "role": "assistant", "content": [self.part(True)] if done else []}

    def _render(self, rec: dict[str, Any], done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if rec["kind"] == "message":
            return self.item(done)
        if rec["kind"] == "reasoning":
            return {"type": "reasoning", "id": rec["id"], "status": status, "summary": [],
                    "content": [{"type": "reasoning_text", "text": rec["text"]}] if done else []}
        call = rec["call"]
        return {"type": "function_call", "id": rec["id"], "call_id": call.id, "name": call.name,
                "arguments": call.arguments if done else "", "status": status}

    def output(self) -> list[dict[str, Any]]:
        return [self._render(rec, True) for rec in self.items]

    def _add(self, rec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self.close_open()
        rec["index"] = len(self.items)
        self.items.append(rec)
        events.append(("response.output_item.added", {"output_index": rec["index"], "item": self._render(rec, False)}))
        if rec["kind"] == "message":
            events.append(("response.content_part.added", {**self._ref(rec), "part": self.part(False)}))
        self._open = rec
        return events

    def _ref(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": rec["id"], "output_index": rec["index"], "content_index": 0}

    def close_open(self) -> list[tuple[str, dict[str, Any]]]:
        rec, self._open = self._open, None
        if rec is None:
            return []
        if rec["kind"] == "message":
            return [("response.output_text.done", {**self._ref(rec), "text": self.text, "logprobs": self.logprobs}),
                    ("response.content_part.done", {**self._ref(rec), "part": self.part(True)}),
                    ("response.output_item.done", {"output_index": rec["index"], "item": self._render(rec, True)})]
        return [("response.reasoning_text.done", {**self._ref(rec), "text": rec["text"]}),
                ("response.output_item.done", {"output_index": rec["index"], "item": self._render(rec, True)})]

    # -- streaming steps -----------------------------------------------------------------------
    def reasoning(self, delta: str) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self._open is None or self._open["kind"] != "reasoning":
            events += self._add({"kind": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "text": ""})
        rec = self._open
        assert rec is not None
        rec["text"] += delta
        return events + [("response.reasoning_text.delta", {**self._ref(rec), "delta": delta})]

    def _message(self) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
        rec = next((r for r in self.items if r["kind"] == "message"), None)
        if rec is not None and self._open is rec:
            return [], rec
        if rec is not None:  # text after a call: the message item is re-opened in place
            events = self.close_open()
            self._open = rec
            return events, rec
        events = self._add({"kind": "message", "id": self.message_id})
        return events, self._open  # type: ignore[return-value]

    def new_round(self) -> None:
        """The tool loop ran a server-side call: the next text is a new paragraph."""
        self._separate = bool(self.text)

    def text_delta(self, delta: str, logprobs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        from mistralrs.tool_calling import ROUND_SEPARATOR

        if self._separate:
            self._separate = False
            delta = ROUND_SEPARATOR + delta
        events, rec = self._message()
        self.text += delta
        self.logprobs.extend(logprobs)
        return events + [("response.output_text.delta", {**self._ref(rec), "delta": delta, "logprobs": logprobs})]

    def call(self, call: Any) -> list[tuple[str, dict[str, Any]]]:
        self.calls.append(call)
        rec = {"kind": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call": call}
        events = self._add(rec)
        self._open = None
        ref = {"item_id": rec["id"], "output_index": rec["index"]}
        return events + [
            ("response.function_call_arguments.delta", {**ref, "delta": call.arguments}),
            ("response.function_call_arguments.done", {**ref, "arguments": call.arguments}),
            ("response.output_item.done", {"output_index": rec["index"], "item": self._render(rec, True)}),
        ]

    def close(self) -> list[tuple[str, dict[str, Any]]]:
        """End of the output: close what is open; an output with nothing gets an empty message."""
        events = self.close_open()
        if not self.items:
            events += self._add({"kind": "message", "id": self.message_id}) + self.close_open()
        return events

    # -- the whole output at once ---------------------------------------------------------------
    def set_output(self, text: str) -> None:
        from mistralrs.tool_calling import ParsedChoice

        parsed = self.plan.parse(text) if self.plan is not None and self.plan.active else ParsedChoice(text, None)
        if self.plan is not None and self.plan.round_contents:
            parsed = ParsedChoice(self.plan.full_content(parsed.content), parsed.reasoning, parsed.calls)
        if parsed.reasoning:
            self.items.append({"kind": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "text": parsed.reasoning,
                               "index": len(self.items)})
        self.text = parsed.content
        if parsed.content or not parsed.calls:
            self.items.append({"kind": "message", "id": self.message_id, "index": len(self.items)})
        for call in parsed.calls:
            self.calls.append(call)
            self.items.append({"kind": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call": call,
                               "index": len(self.items)})

    def assistant_message(self) -> dict[str, Any]:
        """The turn as a chat message (for chaining with previous_response_id)."""
        if not self.calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.text or None,
                "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in self.calls]}

    def obj(self) -> dict[str, Any]:
        finished = self.status in ("completed", "incomplete")
        sampling = self.gen.sampling
        fmt = (self.body.get("text") or {}).get("format") if isinstance(self.body.get("text"), Mapping) else None
        reasoning = self.body.get("reasoning") if isinstance(self.body.get("reasoning"), Mapping) else {}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": int(time.time()) if finished else None,
            "error": self.error, "incomplete_details": self.incomplete,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.gen.max_tokens, "model": self.model,
            "output": self.output() if finished else [],
            "parallel_tool_calls": True, "previous_response_id": self.previous_id,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": self.body.get("store", True) is not False,
            "temperature": getattr(sampling, "temperature", None), "top_p": getattr(sampling, "top_p", None),
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": self.body.get("tool_choice", "auto"),
            "tools": self.body.get("tools") or [], "truncation": "disabled",
            "usage": self.usage, "user": self.body.get("user"), "metadata": self.body.get("metadata") or {},
            "output_text": self.text if finished else "",
        }

    def finish(self, done: Any, *, streamed: bool = False) -> None:
        choice = done.choices[0]
        if not streamed:
            self.set_output(choice.text)
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
    from mistralrs.tool_calling import prepare_chat
    from mistralrs_plugins.frontends.openai_server.app import (
        ARRIVAL,
        STATE,
        build_request,
        collect_events,
        stream_events,
    )

    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    model_name = state.resolve_name(body)
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
    chat = chat_body(body, system + history + new_messages)
    plan = await build_request(request, prepare_chat, service, chat, state.tools)
    gen = plan.request
    builder = ResponseBuilder(body, model=model_name, previous_id=prev_id, gen=gen, plan=plan)
    store = flag(body, "store", True)
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit_chat(service, plan)
    first_round = len(system) + len(history) + len(new_messages)

    def save() -> None:
        if store:
            rounds = [m for m in plan.messages[first_round:]]
            conversation = history + new_messages + rounds + [builder.assistant_message()]
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
    lp_stream = P.ChatStream(service.tokenizer, id=builder.id, model=model_name, n=1, logprobs=gen.logprobs)
    pipe = plan.new_pipeline() if plan.active else None
    pending_lps: list[dict[str, Any]] = []

    def ev(kind: str, **data: Any) -> bytes:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **data}
        seq += 1
        return sse_data(payload, event=kind)

    def emit(steps: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
        return [ev(kind, **data) for kind, data in steps]

    def output(parsed: tuple[str, str, list[Any]]) -> list[bytes]:
        nonlocal pending_lps
        reasoning, content, deltas = parsed
        steps: list[tuple[str, dict[str, Any]]] = []
        if reasoning:
            steps += builder.reasoning(reasoning)
        if content:
            steps += builder.text_delta(content, pending_lps)
            pending_lps = []
        for d in deltas:
            from mistralrs.parsing import ToolCall

            steps += builder.call(ToolCall(id=d.id or "", name=d.name or "", arguments=d.arguments))
        return emit(steps)

    head = [ev("response.created", response=builder.obj()), ev("response.in_progress", response=builder.obj())]

    def convert(event: Any) -> list[bytes]:
        nonlocal pipe, pending_lps
        name = type(event).__name__
        if gen.logprobs and name in ("TokenDelta", "ChoiceFinished"):
            for chunk in lp_stream.chunks_for(event):
                entries = chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
                pending_lps += [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                                 "top_logprobs": [{"token": service.tokenizer.decode([t.token],
                                                                                    skip_special_tokens=False),
                                                   "logprob": t.logprob} for t in e.top_logprobs]}
                                for e in entries]
        if name == "TokenDelta":
            if event.token_ids:
                tracker.token(event.index, len(event.token_ids))
            if pipe is not None:
                return output(pipe.feed(event.text)) if event.text else []
            return output(("", event.text, [])) if event.text else []
        if name == "RoundBoundary":
            out = output(pipe.finish()) if pipe is not None else []
            pipe = plan.new_pipeline()
            builder.new_round()
            return out
        if name == "ChoiceFinished":
            out = output(pipe.finish()) if pipe is not None else []
            if pending_lps:
                builder.logprobs.extend(pending_lps)
                pending_lps = []
            return out
        if name == "RequestDone":
            tracker.done(event)
            builder.finish(event, streamed=True)
            steps = builder.close()
            save()
            terminal = {"completed": "response.completed", "incomplete": "response.incomplete",
                        "cancelled": "response.cancelled"}.get(builder.status, "response.completed")
            return emit(steps) + [ev(terminal, response=builder.obj())]
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
