"""Pieces shared by the server's handlers: OpenAI-shaped errors, JSON bodies, SSE framing and
an event source that interleaves keep-alives with engine events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Mapping

from aiohttp import web

from mistralrs import json_input
from mistralrs.errors import InvalidRequest, MistralRsError, NotFoundError

BODY_LIMIT = 50 * 1024 * 1024  # mistral.rs's DefaultBodyLimit

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error_body(status: int, message: str, *, type: str | None = None, param: str | None = None,
               code: str | None = None, **extra: Any) -> dict[str, Any]:
    err = {"message": message, "type": type or ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    err.update(extra)
    return {"error": err}


class ApiError(Exception):
    """An error to send as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, type=type, param=param, code=code, **extra)
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers, dumps=dumps)


def api_error_from(exc: BaseException) -> ApiError:
    """The HTTP error for an exception raised while handling a request."""
    if isinstance(exc, ApiError):
        return exc
    n_prompt = getattr(exc, "n_prompt_tokens", None)
    if isinstance(exc, InvalidRequest) and n_prompt is not None:
        return ApiError(400, str(exc), type="exceed_context_size_error", param=exc.param,
                        code="exceed_context_size_error", n_prompt_tokens=n_prompt, n_ctx=getattr(exc, "n_ctx", None))
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc))
    if isinstance(exc, MistralRsError):
        status = int(getattr(exc, "http_status", 500) or 500)
        param = "messages" if type(exc).__name__ == "TemplateError" else None
        return ApiError(status, str(exc) or type(exc).__name__, param=param if status == 400 else None)
    return ApiError(500, f"internal server error: {type(exc).__name__}: {exc}")


def stream_error_payload(exc: BaseException) -> dict[str, Any]:
    err = api_error_from(exc)
    return err.body


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 naming what is wrong."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is larger than the {BODY_LIMIT // (1024 * 1024)} MB limit",
                       code="request_too_large") from None
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json_input.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not a JSON {type(body).__name__}",
                       code="invalid_json")
    return body


def flag(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def stream_settings(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage), validated as OpenAI does."""
    stream = flag(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(opts, Mapping):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        value = opts.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
        include_usage = bool(value)
    return stream, include_usage


# -- SSE ------------------------------------------------------------------------------------
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}
KEEP_ALIVE_LINE = b": keep-alive\n\n"
DONE_LINE = b"data: [DONE]\n\n"


def sse_data(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dumps(payload)}\n\n".encode()


class SSEWriter:
    """Starts the event stream lazily: errors before the first byte stay plain HTTP errors."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def write(self, data: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await self.response.prepare(self.request)
        await self.response.write(data)

    async def finish(self) -> web.StreamResponse:
        if self.response is None:
            self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await self.response.prepare(self.request)
        await self.response.write_eof()
        return self.response


# -- engine events with keep-alives ---------------------------------------------------------
KEEPALIVE = object()
END = object()


class EventSource:
    """`await next()` gives the request's next engine event, `KEEPALIVE` after `interval`
    seconds without one, or `END`. `close()` cancels the request unless it finished."""

    def __init__(self, handle: Any, interval: float | None, on_close: Any = None) -> None:
        self.handle = handle
        self.interval = interval if interval and interval > 0 else None
        self._it = handle.__aiter__()
        self._task: asyncio.Future | None = None
        self._finished = False
        self._on_close = on_close

    async def next(self) -> Any:
        if self._finished:
            return END
        if self._task is None:
            self._task = asyncio.ensure_future(self._it.__anext__())
        done, _ = await asyncio.wait({self._task}, timeout=self.interval)
        if not done:
            return KEEPALIVE
        task, self._task = self._task, None
        try:
            event = task.result()
        except StopAsyncIteration:
            self._finished = True
            return END
        name = type(event).__name__
        if name in ("RequestDone", "RequestFailed"):
            self._finished = True
        return event

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await task
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if not getattr(self.handle, "done", True):
            self.handle.cancel()
        if self._on_close is not None:
            self._on_close(self.handle)
