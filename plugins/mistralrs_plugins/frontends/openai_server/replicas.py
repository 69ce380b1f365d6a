"""`serve --data-parallel-size N`: N replica servers (processes) behind one front server.

Each replica is this same `serve` (model, engine, tools) listening on a private 127.0.0.1 port
with an internal API key; the front server answers on the user's host and port, checks the
user's API key, and forwards every request to the replica `mistralrs.distributed.replicas.Router`
picks (in-flight load and prefix affinity), streaming the answer back unchanged, with an
``x-mistralrs-replica`` header. ``/health`` is ready when every live replica is; a replica that
dies is taken out of the rotation (its in-flight requests get a 502), and the front server exits
when none is left. SIGINT/SIGTERM stops the replicas (each drains) and then the front.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing
import secrets
import signal
import sys
import time
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from mistralrs.distributed.replicas import Router, affinity_key
from mistralrs.distributed.world import free_port, run_named

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "authorization",
               "content-encoding"}


class ReplicatedServer:
    def __init__(self, args: argparse.Namespace, n: int) -> None:
        self.args = args
        self.n = n
        self.key = secrets.token_hex(16)  # the replicas accept only the front server
        self.router = Router(n)
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[Any] = []
        self.ready = [False] * n
        self.exit_code = 0
        self.stop = asyncio.Event()
        self.session: ClientSession | None = None

    # -- replicas ---------------------------------------------------------------------------
    def start_replicas(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for i, port in enumerate(self.ports):
            a = copy.copy(self.args)
            a.port, a.host, a.api_key, a.data_parallel_size = port, "127.0.0.1", self.key, 1
            a.ui, a.mcp_port = False, None
            # `cli.replica_main` by name: cli imports this module
            proc = ctx.Process(target=run_named, name=f"mistralrs-replica{i}",
                               args=("mistralrs_plugins.frontends.openai_server.cli:replica_main", a))
            proc.start()
            self.procs.append(proc)

    async def watch(self) -> None:
        """Readiness of each replica (its /health), and replicas that exit."""
        assert self.session is not None
        while not self.stop.is_set():
            for i, proc in enumerate(self.procs):
                if not self.router.alive[i]:
                    continue
                if proc.exitcode is not None:
                    self.router.down(i)
                    print(f"mistralrs: error: data-parallel replica {i} exited (code {proc.exitcode}); "
                          f"{sum(self.router.alive)} left", file=sys.stderr, flush=True)
                    continue
                if not self.ready[i]:
                    try:
                        async with self.session.get(f"http://127.0.0.1:{self.ports[i]}/health",
                                                    timeout=ClientTimeout(total=2)) as r:
                            self.ready[i] = r.status == 200
                    except (OSError, asyncio.TimeoutError):
                        pass
                    if self.ready[i] and all(self.ready[j] or not self.router.alive[j] for j in range(self.n)):
                        print(f"mistralrs: {self.n} data-parallel replicas ready", file=sys.stderr, flush=True)
            if not any(self.router.alive):
                print("mistralrs: error: every data-parallel replica is down; stopping", file=sys.stderr, flush=True)
                self.exit_code = 1
                self.stop.set()
                return
            await asyncio.sleep(0.25)

    def stop_replicas(self, timeout: float) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid:
                proc.terminate()  # SIGTERM: the replica drains
        deadline = time.time() + timeout + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.time()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    # -- the front server -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        live = [i for i in range(self.n) if self.router.alive[i]]
        ok = bool(live) and all(self.ready[i] for i in live)
        return web.json_response({"status": "ok" if ok else "model_loading", "replicas": self.router.snapshot()},
                                 status=200 if ok else 503)

    def _authorized(self, request: web.Request) -> bool:
        key = self.args.api_key
        if not key or request.method == "OPTIONS":
            return True
        return request.headers.get("Authorization", "") == f"Bearer {key}"

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "invalid or missing API key; send Authorization: Bearer KEY", "invalid_api_key")
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None  # the replica answers the 400
        key = affinity_key(request.path, parsed)
        if key is None and request.match_info.get("tail", "").startswith("v1/responses/"):
            key = "resp:" + request.match_info["tail"].split("/")[2]
        try:
            i = self.router.pick(key)
        except RuntimeError as exc:
            return _error(503, str(exc), "replicas_down")
        self.router.started(i)
        try:
            return await self._proxy(request, body, i, key)
        finally:
            self.router.finished(i)

    async def _proxy(self, request: web.Request, body: bytes, i: int, key: str | None) -> web.StreamResponse:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Authorization"] = f"Bearer {self.key}"
        url = f"http://127.0.0.1:{self.ports[i]}{request.path_qs}"
        out: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, url, data=body, headers=headers,
                                            timeout=ClientTimeout(total=None, sock_connect=10)) as resp:
                out = web.StreamResponse(status=resp.status, headers={
                    k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS})
                out.headers["x-mistralrs-replica"] = str(i)
                await out.prepare(request)
                first = b""
                async for chunk in resp.content.iter_any():
                    if len(first) < 256:
                        first += chunk[:256]
                    await out.write(chunk)
                await out.write_eof()
                if request.path == "/v1/responses" and resp.status == 200:
                    self._remember_response(first, i)
                return out
        except (OSError, asyncio.TimeoutError) as exc:
            if self.procs[i].exitcode is not None:
                self.router.down(i)
            if out is not None and out.prepared:
                return out  # the answer was under way: the client sees it cut short
            return _error(502, f"data-parallel replica {i} failed ({type(exc).__name__}); retry the request",
                          "replica_failed")

    def _remember_response(self, head: bytes, i: int) -> None:
        """A stored Response lives in the replica that made it: later turns go there."""
        text = head.decode(errors="ignore")
        marker = '"id":'
        at = text.find(marker)
        if at >= 0:
            rest = text[at + len(marker):].lstrip().lstrip('"')
            rid = rest.split('"', 1)[0]
            if rid.startswith("resp"):
                self.router.remember("resp:" + rid, i)

    async def serve(self) -> int:
        self.session = ClientSession()
        runner = web.AppRunner(self.app(), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.args.host, self.args.port)
        try:
            await site.start()
        except OSError as exc:
            print(f"mistralrs: error: cannot listen on {self.args.host}:{self.args.port}: {exc.strerror or exc}",
                  file=sys.stderr, flush=True)
            await runner.cleanup()
            await self.session.close()
            return 1
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "") else self.args.host
        print(f"mistralrs: serving {self.args.model_id} on http://{host}:{port} "
              f"(data parallel: {self.n} replicas, loading)", file=sys.stderr, flush=True)
        self.start_replicas()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        watcher = asyncio.create_task(self.watch())
        try:
            await self.stop.wait()
        finally:
            watcher.cancel()
            await site.stop()
            await loop.run_in_executor(None, self.stop_replicas, float(self.args.shutdown_timeout))
            await runner.cleanup()
            await self.session.close()
            print("mistralrs: stopped", file=sys.stderr, flush=True)
        return self.exit_code


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "server_error" if status >= 500 else
                                        "invalid_request_error", "param": None, "code": code}}, status=status)


def run_replicated(args: argparse.Namespace, n: int) -> int:
    server = ReplicatedServer(args, n)
    try:
        return asyncio.run(server.serve())
    except KeyboardInterrupt:
        server.stop_replicas(5)
        return 130
