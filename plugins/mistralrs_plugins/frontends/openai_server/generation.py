"""Running an engine request for a handler: building it (off the event loop when the prompt is
big), collecting it to the end, or streaming its events as SSE with keep-alives."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

from aiohttp import web

from mistralrs import protocol as P
from mistralrs_plugins.frontends.openai_server.common import (
    DONE_LINE,
    END,
    KEEP_ALIVE_LINE,
    KEEPALIVE,
    ApiError,
    EventSource,
    SSEWriter,
    sse_data,
    stream_error_payload,
)
from mistralrs_plugins.frontends.openai_server.metrics import GenerationTracker
from mistralrs_plugins.frontends.openai_server.state import ServerState

log = logging.getLogger("mistralrs.server")

OFFLOAD_BYTES = 64 * 1024  # prompts bigger than this are templated/tokenized off the event loop


async def build_request(request: web.Request, build: Callable[..., Any], *args: Any) -> Any:
    """Run a `protocol.build_*_request`; big prompts, and prompts with images (fetched and
    decoded while the request is built), in a thread so streams keep flowing."""
    if (request.content_length or 0) > OFFLOAD_BYTES or any(_has_images(a) for a in args):
        return await asyncio.to_thread(build, *args)
    return build(*args)


def _has_images(body: Any) -> bool:
    from mistralrs.multimodal.messages import IMAGE_PART_TYPES

    messages = body.get("messages") if isinstance(body, dict) else None
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in m["content"]) for m in messages)


def check_best_of(gen: Any, stream: bool) -> None:
    if gen.best_of is not None and gen.best_of > gen.n:
        if stream:
            raise ApiError(400, "best_of > n cannot be streamed", param="best_of")
        if gen.logprobs:
            raise ApiError(400, "best_of > n cannot be combined with logprobs", param="best_of")


async def collect_events(state: ServerState, handle: Any, tracker: GenerationTracker) -> tuple[Any, dict]:
    """Run a request to the end (non-streaming); the engine request is cancelled if we are."""
    lps = P.LogprobCollector()
    source = EventSource(handle, None, on_close=state.release)
    try:
        while True:
            event = await source.next()
            if event is END:
                raise RuntimeError("the request ended without a result")
            name = type(event).__name__
            if name == "TokenDelta":
                if event.token_ids:
                    tracker.token(event.index, len(event.token_ids))
                lps.add(event)
            elif name == "RoundBoundary":
                lps.entries.pop(event.index, None)  # the response describes the last round
            elif name == "RequestDone":
                tracker.done(event)
                return event, lps.entries
            elif name == "RequestFailed":
                raise event.error
    finally:
        await source.close()


async def stream_events(request: web.Request, state: ServerState, handle: Any,
                        convert: Callable[[Any], list[Any]], *, head: Sequence[Any] = (),
                        done_line: bool = True, on_error: Callable[[BaseException], list[bytes]] | None = None,
                        keep_alive: bytes = KEEP_ALIVE_LINE) -> web.StreamResponse:
    """Send a request's events as SSE: `convert(event)` gives the payloads (dicts, or bytes
    already framed) for each event; keep-alive comments fill silences. An engine failure
    before the first byte is an HTTP error, after it an error event; the stream always ends
    with `data: [DONE]` (unless done_line is False). `keep_alive` is what fills a silence."""
    writer = SSEWriter(request)
    source = EventSource(handle, state.keep_alive, on_close=state.release)

    async def send(payloads: list[Any]) -> None:
        for p in payloads:
            await writer.write(p if isinstance(p, bytes) else sse_data(p))

    try:
        if head:
            await send(list(head))
        while True:
            event = await source.next()
            if event is END:
                break
            if event is KEEPALIVE:
                await writer.write(keep_alive)
                continue
            if type(event).__name__ == "RequestFailed":
                if not writer.started:
                    raise event.error
                log.error("generation failed mid-stream: %s", event.error)
                await send(on_error(event.error) if on_error else [stream_error_payload(event.error)])
                break
            await send(convert(event))
        if done_line:
            await writer.write(DONE_LINE)
        return await writer.finish()
    except ConnectionResetError:
        # The client went away: stop generating for it.
        handle.cancel()
        return writer.response or web.Response(status=499)
    except Exception as exc:
        if not writer.started:
            raise  # still a plain HTTP error
        log.exception("streaming failed")
        handle.cancel()
        try:
            await send(on_error(exc) if on_error else [stream_error_payload(exc)])
            if done_line:
                await writer.write(DONE_LINE)
            return await writer.finish()
        except ConnectionResetError:
            return writer.response or web.Response(status=499)
    finally:
        await source.close()
