"""The OpenAI-compatible HTTP server on aiohttp.

`create_app(state)` builds the aiohttp application over a `ServerState` (the model service,
or None while it loads); `OpenAIServer` binds it to a socket, loads the model in the
background, and drains in-flight requests on SIGINT/SIGTERM. Requests go through the same
`mistralrs.protocol` validation and engine as the Python API.

The pieces live next to this module: `state.py` (ServerState and the app keys),
`middleware.py` (auth, CORS, errors, request metrics), `routes.py` (the handlers),
`responses.py` (the Responses API) and `generation.py` (collecting and streaming requests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

from aiohttp import web

from mistralrs.errors import MistralRsError
from mistralrs_plugins.frontends.openai_server import responses as R
from mistralrs_plugins.frontends.openai_server import routes
from mistralrs_plugins.frontends.openai_server.common import BODY_LIMIT
from mistralrs_plugins.frontends.openai_server.generation import build_request, collect_events, stream_events
from mistralrs_plugins.frontends.openai_server.middleware import OPEN_PATHS, main_middleware, on_prepare
from mistralrs_plugins.frontends.openai_server.state import (
    ARRIVAL,
    REQUEST_ID,
    STATE,
    ServerState,
    keep_alive_seconds,
)

__all__ = [
    "ARRIVAL", "OPEN_PATHS", "REQUEST_ID", "STATE", "OpenAIServer", "ServerState", "build_request",
    "collect_events", "create_app", "keep_alive_seconds", "main_middleware", "stream_events",
]

log = logging.getLogger("mistralrs.server")


# -- the application -------------------------------------------------------------------------
def create_app(state: ServerState, *, mounts: tuple[str, ...] = ()) -> web.Application:
    """The application; `mounts` names frontends to mount beyond the default ones (`webui`)."""
    app = web.Application(client_max_size=BODY_LIMIT, middlewares=[main_middleware])
    app[STATE] = state
    app.on_response_prepare.append(on_prepare)
    r = app.router
    r.add_get("/", routes.alive)
    r.add_get("/health", routes.health)
    r.add_get("/metrics", routes.metrics)
    r.add_get("/v1/models", routes.list_models)
    r.add_get("/v1/models/{model:.+}", routes.get_model)
    r.add_post("/v1/chat/completions", routes.chat_completions)
    r.add_post("/v1/completions", routes.completions)
    r.add_post("/v1/embeddings", routes.embeddings)
    r.add_post("/v1/responses", R.create_response)
    r.add_get("/v1/responses/{response_id}", R.get_response)
    r.add_delete("/v1/responses/{response_id}", R.delete_response)
    r.add_get("/v1/responses/{response_id}/input_items", R.list_input_items)
    r.add_post("/tokenize", routes.tokenize)
    r.add_post("/detokenize", routes.detokenize)
    r.add_post("/re_isq", routes.re_isq)
    r.add_get("/openapi.json", routes.openapi_json)
    r.add_get("/api-doc/openapi.json", routes.openapi_json)
    r.add_get("/docs", routes.docs)
    r.add_get("/docs/", routes.docs)
    mount_frontends(app, mounts)
    return app


def mount_frontends(app: web.Application, names: tuple[str, ...] = ()) -> None:
    """Add the routes of the frontends that mount on this server (`FrontendSpec.mount`): the
    Anthropic Messages API by default, the web UI when named (`serve --ui`)."""
    from mistralrs.plugins import get_registry
    from mistralrs.specs import resolve

    for spec in get_registry().frontends:
        if spec.mount is not None and (spec.mount_by_default or spec.name in names):
            resolve(spec.mount)(app)


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
                 tools: Any = None, model_ids: list[str] | None = None, mcp_port: int | None = None,
                 ui: bool = False) -> None:
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
        self.ui = ui  # the web UI at /ui (`serve --ui`)
        self.app = create_app(self.state, mounts=("webui",) if ui else ())
        self.mcp_port = mcp_port  # the MCP server's port (the `mcp_server` frontend), if any
        self.mcp: Any = None
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
        if self.ui:
            self._say(f"web UI on http://{self.host}:{self.port}/ui")
        if self.mcp_port is not None:
            await self._start_mcp()
        self._loaded = loop.create_future()
        if self.state.service is not None:
            self._loaded.set_result(self.state.service)
        else:
            self._start_loading(loop)

    async def _start_mcp(self) -> None:
        """The `mcp_server` frontend over the same state, on its own port and thread."""
        from mistralrs.plugins import get_registry
        from mistralrs.specs import resolve

        factory = resolve(get_registry().frontends.get("mcp_server").factory)
        self.mcp = factory(self.state, host=self.host, port=self.mcp_port)
        await asyncio.to_thread(self.mcp.start)
        self._say(f"MCP server on {self.mcp.url}")

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
                for svc in (result.values() if isinstance(result, dict) else [result]):
                    world = getattr(svc, "world", None)  # tensor parallel: a lost rank stops the server
                    if world is not None:
                        world.on_broken.append(lambda exc: loop.call_soon_threadsafe(self._fatal, exc))
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

    def _fatal(self, error: BaseException) -> None:
        """The model can no longer run (a tensor-parallel rank is gone): say so and shut down."""
        print(f"mistralrs: error: {error}", file=sys.stderr, flush=True)
        self.exit_code = int(getattr(error, "exit_code", 1) or 1)
        if self._stop is not None:
            self._stop.set()

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
        if self.mcp is not None:
            await asyncio.to_thread(self.mcp.close)
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
        except (OSError, MistralRsError) as exc:
            message = str(exc) if isinstance(exc, MistralRsError) else \
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            print(f"mistralrs: error: {message}", file=sys.stderr, flush=True)
            if self._runner is not None:
                await self._runner.cleanup()
            return int(getattr(exc, "exit_code", 1))
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
