"""The OpenAI server's middleware: request ids, API-key checks, CORS headers, metrics of every
API request, and turning any exception into an OpenAI-shaped error response."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any, Callable

from aiohttp import web

from mistralrs_plugins.frontends.openai_server.common import BODY_LIMIT, ApiError, api_error_from
from mistralrs_plugins.frontends.openai_server.state import ARRIVAL, REQUEST_ID, STATE

log = logging.getLogger("mistralrs.server")

CORS_ALLOW_HEADERS = "Content-Type, Authorization, x-api-key, anthropic-version, anthropic-beta, x-request-id"
CORS_ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
# Routes that answer without an API key, and that stay out of the HTTP metrics.
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/", "/openapi.json", "/api-doc/openapi.json"})
UNMETERED_PATHS = OPEN_PATHS | {"/metrics"}
# Routes whose errors another API's envelope wraps: path prefix -> (ApiError) -> web.Response.
# A mounted frontend (the Anthropic Messages API) adds its own.
ERROR_ENVELOPES: web.AppKey[dict[str, Callable[[ApiError], web.Response]]] = web.AppKey(
    "mistralrs_error_envelopes", dict)


# Path prefixes a mounted frontend serves without an API key and outside the metrics (the web UI's
# static files: the page asks for the key itself).
OPEN_PREFIXES: web.AppKey[list[str]] = web.AppKey("mistralrs_open_prefixes", list)


def _open(request: web.Request) -> bool:
    prefixes: Any = request.app.get(OPEN_PREFIXES) or ()
    return request.path in OPEN_PATHS or any(request.path.startswith(p) for p in prefixes)


def error_response(request: web.Request, err: ApiError) -> web.Response:
    """`err` in the error envelope of the API the request's route belongs to (OpenAI's by default)."""
    envelopes: Any = request.app.get(ERROR_ENVELOPES) or {}
    for prefix, render in envelopes.items():
        if request.path.startswith(prefix):
            return render(err)
    return err.response()


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
    is_open = _open(request)
    metered = path not in UNMETERED_PATHS and not is_open  # API routes: counted, and waited for when draining
    status = 500
    if metered:
        state.metrics.in_flight += 1
        state.active += 1
    try:
        if state.api_key and not is_open and not _authorized(request, state.api_key):
            raise ApiError(401, "missing or invalid API key; send `Authorization: Bearer <key>` or `x-api-key: <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return error_response(request, exc)
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
        return error_response(request, err)
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
    return error_response(request, err)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    state = request.app[STATE]
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = "x-request-id"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
    rid = request.get(REQUEST_ID)
    if rid and state.request_id_header:
        response.headers["x-request-id"] = rid

