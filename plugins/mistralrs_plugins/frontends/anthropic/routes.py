"""The Anthropic Messages API's handlers, mounted on the `serve` server by `mount(app)`:
`POST /v1/messages` (whole or streamed) and `POST /v1/messages/count_tokens`. A request is
converted to the chat body it means and runs as a chat request does (`prepare_chat`, the
server's tool loop, `protocol.ChatStream`); errors on these routes use Anthropic's envelope."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mistralrs import protocol as P
from mistralrs_plugins.frontends.anthropic.request import to_chat_body
from mistralrs_plugins.frontends.anthropic.response import (
    PING,
    MessageStream,
    error_response,
    message_id,
    message_object,
)
from mistralrs_plugins.frontends.openai_server.common import dumps, flag, read_json
from mistralrs_plugins.frontends.openai_server.generation import build_request, collect_events, stream_events
from mistralrs_plugins.frontends.openai_server.middleware import ERROR_ENVELOPES
from mistralrs_plugins.frontends.openai_server.state import ARRIVAL, STATE

PREFIX = "/v1/messages"


def mount(app: web.Application) -> None:
    app.router.add_post(PREFIX, create_message)
    app.router.add_post(f"{PREFIX}/count_tokens", count_tokens)
    envelopes = app.get(ERROR_ENVELOPES)
    if envelopes is None:
        envelopes = app[ERROR_ENVELOPES] = {}
    envelopes[PREFIX] = error_response


async def _plan(request: web.Request, body: dict[str, Any], *, count_only: bool = False) -> tuple[Any, Any, str]:
    from mistralrs.chat_plan import prepare_chat

    state = request.app[STATE]
    service = state.require_service(body)
    model_name = state.resolve_name(body)
    chat = to_chat_body(body, count_only=count_only)
    return await build_request(request, prepare_chat, service, chat, state.tools), service, model_name


async def create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    stream = flag(body, "stream")
    plan, service, model_name = await _plan(request, body)
    stops = list(body.get("stop_sequences") or ())
    mid = message_id()
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit_chat(service, plan)
    if not stream:
        done, _ = await collect_events(state, handle, tracker)
        chat = P.chat_response(service.tokenizer, done, id=mid, model=model_name, logprobs=False,
                               token_logprobs={}, plan=plan, records=plan.records)
        return web.json_response(message_object(chat, done, id=mid, model=model_name, stop_sequences=stops),
                                 dumps=dumps)
    chunks = P.ChatStream(service.tokenizer, id=mid, model=model_name, n=1, logprobs=False, plan=plan)
    out = MessageStream(id=mid, model=model_name, input_tokens=len(plan.request.prompt_ids), stop_sequences=stops)

    def convert(event: Any) -> list[bytes]:
        name = type(event).__name__
        if name == "TokenDelta" and event.token_ids:
            tracker.token(event.index, len(event.token_ids))
        events = [e for chunk in chunks.chunks_for(event) for e in out.chunk(chunk)]
        if name == "RequestDone":
            tracker.done(event)
            events += out.finish(event)
        return events

    return await stream_events(request, state, handle, convert, head=out.start(), done_line=False,
                               on_error=MessageStream.error, keep_alive=PING)


async def count_tokens(request: web.Request) -> web.Response:
    """`{"input_tokens": N}`: the prompt the request would send, tools and system included."""
    body = await read_json(request)
    try:
        plan, _, _ = await _plan(request, body, count_only=True)
    except Exception as exc:
        n = getattr(exc, "n_prompt_tokens", None)
        if n is None or getattr(exc, "at_least", False):
            raise
        return web.json_response({"input_tokens": n}, dumps=dumps)  # it does not fit, but it has a count
    return web.json_response({"input_tokens": len(plan.request.prompt_ids)}, dumps=dumps)
