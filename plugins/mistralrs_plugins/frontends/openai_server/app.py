"""The OpenAI-compatible HTTP server on aiohttp.

`create_app(state)` builds the aiohttp application over a `ServerState` (the model service,
or None while it loads); `OpenAIServer` binds it to a socket, loads the model in the
background, and drains in-flight requests on SIGINT/SIGTERM. Requests go through the same
`mistralrs.protocol` validation and engine as the Python API.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from aiohttp import web

from mistralrs import protocol as P
from mistralrs_plugins.frontends.openai_server.common import (
    BODY_LIMIT,
    DONE_LINE,
    END,
    KEEP_ALIVE_LINE,
    KEEPALIVE,
    ApiError,
    EventSource,
    SSEWriter,
    api_error_from,
    dumps,
    flag,
    read_json,
    sse_data,
    stream_error_payload,
    stream_settings,
)
from mistralrs_plugins.frontends.openai_server.metrics import GenerationTracker, Metrics

log = logging.getLogger("mistralrs.server")

DEFAULT_KEEP_ALIVE_MS = 10_000
CORS_ALLOW_HEADERS = "Content-Type, Authorization, x-api-key, anthropic-version, anthropic-beta, x-request-id"
CORS_ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
# Routes that answer without an API key, and that stay out of the HTTP metrics.
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/", "/openapi.json", "/api-doc/openapi.json"})
UNMETERED_PATHS = OPEN_PATHS | {"/metrics"}


def keep_alive_seconds(value_ms: float | None = None) -> float:
    """KEEP_ALIVE_INTERVAL (ms, default 10000) as seconds; 0 or less disables keep-alives."""
    if value_ms is None:
        raw = os.environ.get("KEEP_ALIVE_INTERVAL", "").strip()
        try:
            value_ms = float(raw) if raw else DEFAULT_KEEP_ALIVE_MS
        except ValueError:
            log.warning("KEEP_ALIVE_INTERVAL=%r is not a number of milliseconds; using %d", raw, DEFAULT_KEEP_ALIVE_MS)
            value_ms = DEFAULT_KEEP_ALIVE_MS
    return value_ms / 1000.0


class ServerState:
    """What every handler shares: the model service (None while loading) and server-wide state."""

    def __init__(self, *, model_id: str, service: Any = None, api_key: str | None = None,
                 keep_alive: float | None = None, enable_metrics: bool = True, request_id_header: bool = True,
                 max_stored_responses: int = 1024, tools: Any = None, model_ids: list[str] | None = None) -> None:
        from mistralrs.tool_calling import ToolConfig
        from mistralrs_plugins.frontends.openai_server.responses import ResponseStore

        self.model_id = model_id  # the default model ("model": "default" or absent)
        self.model_ids = list(model_ids or [model_id])  # every model this server serves (from-config)
        if model_id not in self.model_ids:
            self.model_ids.insert(0, model_id)
        self.services: dict[str, Any] = {}
        self.tools = tools if tools is not None else ToolConfig()
        self.service = service
        self.api_key = api_key or None
        self.keep_alive = keep_alive_seconds() if keep_alive is None else keep_alive
        self.enable_metrics = enable_metrics
        self.request_id_header = request_id_header
        self.load_error: BaseException | None = None
        self.draining = False
        self.active = 0  # API requests being served (for draining)
        self.handles: set[Any] = set()  # live engine requests
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.service)
        self.responses = ResponseStore(max_stored_responses)

    @property
    def service(self) -> Any:
        """The default model's service (None while it loads)."""
        return self.services.get(self.model_id)

    @service.setter
    def service(self, value: Any) -> None:
        if value is None:
            self.services.pop(self.model_id, None)
        else:
            self.services[self.model_id] = value

    def resolve_name(self, body: dict[str, Any] | None = None) -> str:
        """The served model a request names: its `model` field, "default" or absent = the default."""
        model = (body or {}).get("model")
        if model is None or model == "default":
            return self.model_id
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {model!r}", param="model")
        if model not in self.model_ids:
            served = ", ".join(repr(m) for m in self.model_ids)
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {served} "
                                '(or use "default")', param="model", code="model_not_found")
        return model

    def require_service(self, body: dict[str, Any] | None = None) -> Any:
        """The service for the request's model; 404 for an unknown model, 503 while loading."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        name = self.resolve_name(body)
        service = self.services.get(name)
        if service is None:
            if self.load_error is not None:
                raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise ApiError(503, f"the model {name} is still loading; retry shortly",
                           code="model_loading", headers={"Retry-After": "1"})
        return service

    def check_model(self, body: dict[str, Any]) -> None:
        self.resolve_name(body)

    def submit(self, service: Any, gen: Any) -> Any:
        handle = service.engine.submit(gen, loop=asyncio.get_running_loop())
        self.handles.add(handle)
        return handle

    def submit_chat(self, service: Any, plan: Any) -> Any:
        """Start a planned chat request: a `ToolLoop` handle (server-side tools run in it)."""
        from mistralrs.tool_calling import ToolLoop

        loop = asyncio.get_running_loop()
        handle = ToolLoop(plan, lambda gen: service.engine.submit(gen, loop=loop))
        self.handles.add(handle)
        return handle

    def release(self, handle: Any) -> None:
        """The server is done with an engine request (finished, or cancelled)."""
        if handle in self.handles:
            self.handles.discard(handle)
            if getattr(handle, "cancelled", False):
                self.metrics.cancelled.inc()


STATE: web.AppKey[ServerState] = web.AppKey("mistralrs_state", ServerState)
# Per-request values (typed keys where this aiohttp has them).
_RequestKey = getattr(web, "RequestKey", None)
REQUEST_ID: Any = _RequestKey("mistralrs_request_id", str) if _RequestKey else "mistralrs_request_id"
ARRIVAL: Any = _RequestKey("mistralrs_arrival", float) if _RequestKey else "mistralrs_arrival"


# -- middleware -------------------------------------------------------------------------------
def _route_label(request: web.Request) -> str:
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    if resource is None:
        return "unmatched"
    return resource.canonical


@web.middleware
async def main_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    state = request.app[STATE]
    request[REQUEST_ID] = request.headers.get("x-request-id") or uuid.uuid4().hex
    request[ARRIVAL] = time.perf_counter()
    if request.method == "OPTIONS":  # CORS preflight (headers are added in on_prepare)
        return web.Response(status=204, headers={"Access-Control-Max-Age": "3600"})
    path = request.path
    metered = path not in UNMETERED_PATHS  # API routes: counted in metrics and waited for when draining
    status = 500
    if metered:
        state.metrics.in_flight += 1
        state.active += 1
    try:
        if state.api_key and path not in OPEN_PATHS and not _authorized(request, state.api_key):
            raise ApiError(401, "missing or invalid API key; send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        status = exc.status
        if exc.status < 400:
            raise
        return _http_exception_response(request, exc)
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    except Exception as exc:  # noqa: BLE001 - any failure becomes an OpenAI-shaped error
        err = api_error_from(exc)
        status = err.status
        if err.status >= 500:
            log.exception("request %s %s failed", request.method, path)
        return err.response()
    finally:
        if metered:
            state.metrics.in_flight -= 1
            state.active -= 1
            state.metrics.observe_request(request.method, _route_label(request), status,
                                          time.perf_counter() - request[ARRIVAL])


def _authorized(request: web.Request, key: str) -> bool:
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer":
        token = request.headers.get("x-api-key", "")
    return bool(token) and hmac.compare_digest(token.strip().encode(), key.encode())


def _http_exception_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        err = ApiError(404, f"no route for {request.method} {request.path}", code="route_not_found")
    elif exc.status == 405:
        err = ApiError(405, f"{request.method} is not allowed on {request.path}", code="method_not_allowed")
    elif exc.status == 413:
        err = ApiError(413, f"the request body is larger than the {BODY_LIMIT // (1024 * 1024)} MB limit",
                       code="request_too_large")
    else:
        err = ApiError(exc.status, exc.reason or "error")
    return err.response()


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    state = request.app[STATE]
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = "x-request-id"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
    rid = request.get(REQUEST_ID)
    if rid and state.request_id_header:
        response.headers["x-request-id"] = rid


# -- simple routes ---------------------------------------------------------------------------
async def alive(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def health(request: web.Request) -> web.Response:
    """Readiness (llama.cpp's convention): 503 `model_loading` until every model is loaded."""
    state: ServerState = request.app[STATE]
    for name in state.model_ids:
        state.require_service({"model": name})  # the 503 while loading, failed or draining
    return web.Response(text="OK")


def _model_card(state: ServerState, model_id: str) -> dict[str, Any]:
    name = state.resolve_name({"model": model_id})
    svc = state.services.get(name)
    return {
        "id": model_id, "object": "model", "created": state.created, "owned_by": "local",
        "root": name, "status": "loaded" if svc is not None else "loading",
        "max_model_len": getattr(svc, "max_model_len", None),
    }


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_service()
    data = [_model_card(state, "default")] + [_model_card(state, m) for m in state.model_ids]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_service()
    model = request.match_info["model"]
    state.resolve_name({"model": model})
    return web.json_response(_model_card(state, model), dumps=dumps)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.enable_metrics:
        raise ApiError(503, "metrics are disabled (--disable-metrics)", code="metrics_disabled")
    return web.Response(text=state.metrics.render(), content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    tok = service.tokenizer
    special = body.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise ApiError(400, "add_special_tokens must be true or false", param="add_special_tokens")
    if body.get("messages") is not None:
        messages = P.normalize_messages(body["messages"])
        text = service.render_chat(messages, add_generation_prompt=flag(body, "add_generation_prompt", True))
        ids = tok.encode(text, add_special_tokens=bool(special))
    else:
        key = "prompt" if "prompt" in body else "content"
        prompt = body.get(key)
        if not isinstance(prompt, str):
            raise ApiError(400, "send `prompt` (a string) or `messages`", param="prompt")
        ids = tok.encode(prompt, add_special_tokens=True if special is None else special)
    out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len}
    if flag(body, "return_token_strs"):
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return web.json_response(out, dumps=dumps)


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    ids = body.get("tokens")
    vocab = int(getattr(service.tokenizer, "vocab_size", 0) or 0)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "tokens must be a list of token ids", param="tokens")
    bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    text = service.tokenizer.decode(ids, skip_special_tokens=flag(body, "skip_special_tokens", False))
    return web.json_response({"prompt": text, "content": text}, dumps=dumps)


async def openapi_json(request: web.Request) -> web.Response:
    from mistralrs_plugins.frontends.openai_server.openapi import openapi_document

    return web.json_response(openapi_document(request.app[STATE]), dumps=dumps)


async def docs(request: web.Request) -> web.Response:
    from mistralrs_plugins.frontends.openai_server.openapi import docs_html, openapi_document

    return web.Response(text=docs_html(openapi_document(request.app[STATE])), content_type="text/html")


# -- generation --------------------------------------------------------------------------------
OFFLOAD_BYTES = 64 * 1024  # prompts bigger than this are templated/tokenized off the event loop


async def build_request(request: web.Request, build: Callable[..., Any], *args: Any) -> Any:
    """Run a `protocol.build_*_request`; big prompts in a thread so streams keep flowing."""
    if (request.content_length or 0) > OFFLOAD_BYTES:
        return await asyncio.to_thread(build, *args)
    return build(*args)


def _check_best_of(gen: Any, stream: bool) -> None:
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
                        done_line: bool = True, on_error: Callable[[BaseException], list[bytes]] | None = None
                        ) -> web.StreamResponse:
    """Send a request's events as SSE: `convert(event)` gives the payloads (dicts, or bytes
    already framed) for each event; keep-alive comments fill silences. An engine failure
    before the first byte is an HTTP error, after it an error event; the stream always ends
    with `data: [DONE]` (unless done_line is False)."""
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
                await writer.write(KEEP_ALIVE_LINE)
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    from mistralrs.tool_calling import prepare_chat

    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    model_name = state.resolve_name(body)
    stream, include_usage = stream_settings(body)
    plan = await build_request(request, prepare_chat, service, body, state.tools)
    gen = plan.request
    _check_best_of(gen, stream)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit_chat(service, plan)
    if not stream:
        done, lps = await collect_events(state, handle, tracker)
        resp = P.chat_response(service.tokenizer, done, id=rid, model=model_name, logprobs=gen.logprobs,
                               token_logprobs=lps, plan=plan, records=plan.records)
        return web.json_response(P.to_json(resp), dumps=dumps)
    conv = P.ChatStream(service.tokenizer, id=rid, model=model_name, n=gen.n, logprobs=gen.logprobs, plan=plan)

    def convert(event: Any) -> list[Any]:
        name = type(event).__name__
        if name == "TokenDelta" and event.token_ids:
            tracker.token(event.index, len(event.token_ids))
        out = [P.to_json(chunk) for chunk in conv.chunks_for(event)]
        if name == "RequestDone":
            tracker.done(event)
            if include_usage:
                out.append(P.to_json(conv.usage_chunk(event)))
        return out

    return await stream_events(request, state, handle, convert)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    model_name = state.resolve_name(body)
    stream, include_usage = stream_settings(body)
    echo = flag(body, "echo")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise ApiError(400, "suffix must be a string", param="suffix")
    gen = await build_request(request, P.build_completion_request, service, body)
    _check_best_of(gen, stream)
    echo_text = ""
    if echo:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        echo_text = prompt if isinstance(prompt, str) else service.tokenizer.decode(gen.prompt_ids)
    rid = f"cmpl-{uuid.uuid4().hex}"
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit(service, gen)
    if not stream:
        done, lps = await collect_events(state, handle, tracker)
        resp = P.completion_response(service.tokenizer, done, id=rid, model=model_name, logprobs=gen.logprobs,
                                     token_logprobs=lps, echo_prefix=echo_text, suffix=suffix or "")
        return web.json_response(P.to_json(resp), dumps=dumps)
    conv = P.ChatStream(service.tokenizer, id=rid, model=model_name, n=gen.n, logprobs=gen.logprobs,
                        completion=True)
    conv.text_offset_start = len(echo_text)

    def text_chunk(index: int, text: str) -> dict[str, Any]:
        return P.to_json(P.CompletionResponse(
            id=rid, created=conv.created, model=model_name,
            choices=[P.CompletionChoice(finish_reason=None, index=index, text=text)],
        ))

    head = [text_chunk(i, echo_text) for i in range(gen.n)] if echo_text else []

    def convert(event: Any) -> list[Any]:
        name = type(event).__name__
        if name == "TokenDelta" and event.token_ids:
            tracker.token(event.index, len(event.token_ids))
        out = []
        if name == "ChoiceFinished" and suffix:
            out.append(text_chunk(event.index, suffix))
        out += [P.to_json(chunk) for chunk in conv.chunks_for(event)]
        if name == "RequestDone":
            tracker.done(event)
            if include_usage:
                out.append(P.to_json(conv.usage_chunk(event)))
        return out

    return await stream_events(request, state, handle, convert, head=head)


# -- the application -------------------------------------------------------------------------
def create_app(state: ServerState) -> web.Application:
    from mistralrs_plugins.frontends.openai_server import responses as R

    app = web.Application(client_max_size=BODY_LIMIT, middlewares=[main_middleware])
    app[STATE] = state
    app.on_response_prepare.append(_on_prepare)
    r = app.router
    r.add_get("/", alive)
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", get_model)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/responses", R.create_response)
    r.add_get("/v1/responses/{response_id}", R.get_response)
    r.add_delete("/v1/responses/{response_id}", R.delete_response)
    r.add_get("/v1/responses/{response_id}/input_items", R.list_input_items)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_get("/openapi.json", openapi_json)
    r.add_get("/api-doc/openapi.json", openapi_json)
    r.add_get("/docs", docs)
    r.add_get("/docs/", docs)
    return app


class OpenAIServer:
    """The `openai_server` frontend: an aiohttp server over one model service.

    Give either a loaded `service` or a `loader()` that builds one; with a loader the socket
    opens first and the model loads in a background thread (requests get 503 meanwhile).
    `run()` serves until SIGINT/SIGTERM, then drains: it stops accepting connections, lets
    in-flight requests finish for up to `shutdown_timeout` seconds, cancels what is left and
    shuts the engine down. A second signal exits at once.
    """

    def __init__(self, service: Any = None, *, loader: Callable[[], Any] | None = None, model_id: str | None = None,
                 host: str = "0.0.0.0", port: int = 1234, api_key: str | None = None,
                 shutdown_timeout: float = 30.0, keep_alive_ms: float | None = None, enable_metrics: bool = True,
                 request_id_header: bool = True, owns_service: bool = True, announce: bool = True,
                 tools: Any = None, model_ids: list[str] | None = None) -> None:
        if service is None and loader is None:
            raise ValueError("OpenAIServer needs a service or a loader")
        model_id = model_id or getattr(service, "model_id", None)
        if not model_id:
            raise ValueError("OpenAIServer needs a model_id")
        self.loader = loader
        self.host, self.port = host, port
        self.shutdown_timeout = shutdown_timeout
        self.owns_service = owns_service
        self.announce = announce
        self.state = ServerState(
            model_id=model_id, service=service, api_key=api_key,
            keep_alive=None if keep_alive_ms is None else keep_alive_ms / 1000.0,
            enable_metrics=enable_metrics, request_id_header=request_id_header, tools=tools,
            model_ids=model_ids,
        )
        self.app = create_app(self.state)
        self._runner: web.AppRunner | None = None
        self._loaded: asyncio.Future | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False
        self.exit_code = 0

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", None) else self.host
        return f"http://{host}:{self.port}"

    def _say(self, message: str) -> None:
        log.info(message)
        if self.announce:
            print(f"mistralrs: {message}", file=sys.stderr, flush=True)

    async def start(self) -> None:
        """Listen, then start loading the model (if a loader was given)."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=2.0,
                                     access_log=logging.getLogger("mistralrs.server.access"))
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        status = "loading the model" if self.state.service is None else "ready"
        self._say(f"serving {self.state.model_id} on http://{self.host}:{self.port} ({status})")
        self._loaded = loop.create_future()
        if self.state.service is not None:
            self._loaded.set_result(self.state.service)
        else:
            self._start_loading(loop)

    def _start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        fut = self._loaded
        loader = self.loader
        assert fut is not None and loader is not None

        def finish(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                self.state.load_error = error
                self.exit_code = int(getattr(error, "exit_code", 1) or 1)
                print(f"mistralrs: error: could not load {self.state.model_id}: {error}", file=sys.stderr, flush=True)
                fut.set_exception(error)
                fut.exception()  # retrieved: no "never retrieved" warning
                if self._stop is not None:
                    self._stop.set()
            else:
                # A loader returns one service, or {model_id: service} for several (from-config).
                if isinstance(result, dict):
                    self.state.services.update(result)
                else:
                    self.state.service = result
                self._say(f"model(s) {', '.join(self.state.services)} loaded; ready")
                fut.set_result(self.state.service)

        def work() -> None:
            try:
                result, error = loader(), None
            except BaseException as exc:  # noqa: BLE001 - reported to the loop
                result, error = None, exc
            if self._closed:
                if result is not None and self.owns_service:
                    for svc in (result.values() if isinstance(result, dict) else [result]):
                        svc.shutdown()
                return
            try:
                loop.call_soon_threadsafe(finish, result, error)
            except RuntimeError:  # the loop is gone
                if result is not None and self.owns_service:
                    result.shutdown()

        threading.Thread(target=work, name="mistralrs-model-load", daemon=True).start()

    async def wait_loaded(self) -> Any:
        """The service once loaded (raises the load error if loading failed)."""
        assert self._loaded is not None, "call start() first"
        return await asyncio.shield(self._loaded)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `timeout` s), stop the engine."""
        if self._closed:
            return
        self._closed = True
        timeout = self.shutdown_timeout if timeout is None else timeout
        state = self.state
        state.draining = True
        loop = asyncio.get_running_loop()
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        deadline = loop.time() + timeout
        if state.active:
            self._say(f"draining {state.active} in-flight request(s) (up to {timeout:g}s)")
        while state.active and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if state.handles:
            log.warning("cancelling %d unfinished request(s)", len(state.handles))
            for handle in list(state.handles):
                handle.cancel()
            end = loop.time() + 5.0
            while state.active and loop.time() < end:
                await asyncio.sleep(0.02)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.owns_service:
            for service in list(state.services.values()):
                await loop.run_in_executor(None, service.shutdown)
        self._say("stopped")

    async def serve(self) -> int:
        """Start, serve until SIGINT/SIGTERM (or `request_stop()`), drain; the exit status."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except OSError as exc:
            print(f"mistralrs: error: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                  file=sys.stderr, flush=True)
            if self._runner is not None:
                await self._runner.cleanup()
            return 1
        stop = self._stop
        assert stop is not None
        installed = []

        def on_signal(signame: str) -> None:
            if stop.is_set():
                print(f"mistralrs: {signame} again; exiting now", file=sys.stderr, flush=True)
                os._exit(130)
            self._say(f"{signame} received; shutting down")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / Windows
                pass
        try:
            await stop.wait()
        finally:
            await self.shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)
        return self.exit_code

    def run(self) -> int:
        try:
            return asyncio.run(self.serve())
        except KeyboardInterrupt:
            return 130
