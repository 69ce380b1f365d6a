"""What every handler of the OpenAI server shares: `ServerState` (the model services, or None
while they load, plus server-wide settings, metrics and stored responses), the typed app and
request keys, and the KEEP_ALIVE_INTERVAL setting."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any

from aiohttp import web

from mistralrs_plugins.frontends.openai_server.common import ApiError
from mistralrs_plugins.frontends.openai_server.metrics import Metrics

log = logging.getLogger("mistralrs.server")

DEFAULT_KEEP_ALIVE_MS = 10_000


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


class ServerState:
    """What every handler shares: the model service (None while loading) and server-wide state."""

    def __init__(self, *, model_id: str, service: Any = None, api_key: str | None = None,
                 keep_alive: float | None = None, enable_metrics: bool = True, request_id_header: bool = True,
                 max_stored_responses: int = 1024, tools: Any = None, model_ids: list[str] | None = None) -> None:
        from mistralrs.tool_choice import ToolConfig

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

    def check_not_draining(self) -> None:
        """503 `shutting_down` once the server drains."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")

    def require_service(self, body: dict[str, Any] | None = None, *, kind: str | None = "text") -> Any:
        """The service for the request's model; 404 for an unknown model, 503 while loading, 400
        when it is not of `kind` (``text``: chat and completions; ``embedding``; None: any)."""
        self.check_not_draining()
        name = self.resolve_name(body)
        service = self.services.get(name)
        if service is None:
            if self.load_error is not None:
                raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise ApiError(503, f"the model {name} is still loading; retry shortly",
                           code="model_loading", headers={"Retry-After": "1"})
        served = getattr(service, "kind", "text")
        if kind is not None and served != kind:
            if served == "embedding":
                raise ApiError(400, f"the model {name!r} is an embedding model: it answers POST /v1/embeddings, not "
                                    "chat or text generation", param="model", code="model_kind_mismatch")
            raise ApiError(400, f"the model {name!r} is a {served} model and cannot make embeddings; send embedding "
                                "requests to an embedding model (serve one with -m, or beside others with from-config)",
                           param="model", code="model_kind_mismatch")
        return service

    def check_model(self, body: dict[str, Any]) -> None:
        self.resolve_name(body)

    def submit(self, service: Any, gen: Any) -> Any:
        handle = service.engine.submit(gen, loop=asyncio.get_running_loop())
        self.handles.add(handle)
        return handle

    def submit_chat(self, service: Any, plan: Any) -> Any:
        """Start a planned chat request: a `ToolLoop` handle (server-side tools run in it)."""
        from mistralrs.tool_loop import ToolLoop

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
