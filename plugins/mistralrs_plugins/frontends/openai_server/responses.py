"""`/v1/responses`: OpenAI's Responses API (OpenResponses) over the chat machinery.

`input` (a string or a list of input items) and `instructions` become chat messages; with
`previous_response_id` the stored conversation of that response comes first (its
instructions do not carry over, as in OpenAI's API). Responses are kept in memory (LRU,
`store: false` opts out) for GET/DELETE and chaining.

The request side is in `responses_input.py`, the response object in `responses_builder.py`;
this module holds the route handlers.
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from aiohttp import web

from mistralrs import protocol as P
from mistralrs.errors import InvalidRequest
from mistralrs.parsed_calls import ToolCall
from mistralrs_plugins.frontends.openai_server.common import (
    ApiError,
    dumps,
    flag,
    read_json,
    sse_data,
    stream_error_payload,
)
from mistralrs_plugins.frontends.openai_server.generation import build_request, collect_events, stream_events
from mistralrs_plugins.frontends.openai_server.responses_builder import ResponseBuilder, response_logprobs
from mistralrs_plugins.frontends.openai_server.responses_input import (
    PASSTHROUGH,
    TEXT_PART_TYPES,
    chat_body,
    input_to_messages,
    text_format,
    validate_body,
)
from mistralrs_plugins.frontends.openai_server.state import ARRIVAL, STATE, ResponseStore

__all__ = [
    "PASSTHROUGH", "TEXT_PART_TYPES", "ResponseBuilder", "ResponseStore", "chat_body", "create_response",
    "delete_response", "get_response", "input_to_messages", "list_input_items", "text_format",
]


# -- handlers -----------------------------------------------------------------------------------
async def create_response(request: web.Request) -> web.StreamResponse:
    from mistralrs.chat_plan import prepare_chat

    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    model_name = state.resolve_name(body)
    validate_body(body)
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
    try:
        plan = await build_request(request, prepare_chat, service, chat, state.tools)
    except InvalidRequest as exc:  # the chat messages come from this request's `input`
        if exc.param != "messages":
            raise
        raise InvalidRequest(str(exc), "input", exc.code) from None
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
            builder.logprobs = response_logprobs(service.tokenizer, lps.get(0, []))
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
