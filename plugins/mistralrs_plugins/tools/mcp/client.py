"""`McpToolSource`: MCP servers' tools as a mistralrs tool source, over the official `mcp` SDK.

The connections live on one asyncio loop in a daemon thread ("mistralrs-mcp"): one task per
server enters the SDK's `Client` (stdio child process, streamable HTTP, or WebSocket), lists
its tools and holds the session open until `close()`. The tool loop calls `call(name, args)`
from its own thread; the call runs on that loop under the config's concurrency cap
(`max_concurrent_calls`) and per-call timeout (`tool_timeout_secs`).

Failures stay with the server that caused them: a server that does not start (or answer
within its timeout) is a warning naming it and the others keep working; a server that dies
later is a warning at its next call, and calls to its tools return an error result to the
model. A tool's own error (`isError`, invalid arguments) comes back as `error: ...` text.
`close()` (the frontends call it on shutdown, and atexit) ends the sessions, which stops
stdio child processes.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

from mistralrs.errors import ConfigError, MistralRsError, NotFoundError
from mistralrs.mcp_config import McpClientConfig, McpServerConfig, McpServerSource, as_mcp_config

log = logging.getLogger("mistralrs.mcp")

ENV_CONFIG = "MCP_CONFIG_PATH"
CONNECT_TIMEOUT_SECS = 30.0


class McpToolError(MistralRsError):
    """A call to an MCP tool failed (timed out, its server is gone, or the server refused it);
    in the tool loop its message becomes the error result the model reads."""


def _require_sdk() -> None:
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise ConfigError("the MCP client needs the `mcp` package: pip install 'mistralrs[mcp]'") from None


def describe(exc: BaseException) -> str:
    """One line for an exception, looking inside anyio's exception groups."""
    while getattr(exc, "exceptions", None):  # a (Base)ExceptionGroup (anyio on Python 3.10: exceptiongroup's)
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        text = message
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def result_text(result: Any) -> str:
    """A `CallToolResult` as the text the model reads; `isError` results start with "error: "."""
    parts: list[str] = []
    for block in result.content or ():
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            res = block.resource
            parts.append(getattr(res, "text", None) or f"[resource {res.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{kind} content{', ' + block.mime_type if getattr(block, 'mime_type', None) else ''}]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    return f"error: {text or 'the tool failed'}" if result.is_error else text


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def exposed_name(prefix: str, tool: str) -> str:
    """`<prefix>_<tool>`, with characters function names cannot hold replaced by `_`."""
    return f"{prefix}_{_UNSAFE.sub('_', tool)}"


def openai_tool(name: str, tool: Any, server: McpServerConfig) -> dict[str, Any]:
    schema = dict(tool.input_schema) if getattr(tool, "input_schema", None) else {"type": "object"}
    fn: dict[str, Any] = {
        "name": name,
        "description": tool.description or getattr(tool, "title", None) or f"{tool.name} (MCP server {server.name})",
        "parameters": schema,
    }
    if schema.get("properties"):
        fn["strict"] = True  # as mistral.rs: MCP tools with an input schema are grammar-constrained
    return {"type": "function", "function": fn}


class _Connection:
    """One configured server: its session while it is alive, and its tools."""

    def __init__(self, server: McpServerConfig) -> None:
        self.server = server
        self.client: Any = None
        self.tools: list[Any] = []
        self.alive = False
        self.stop: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return self.server.label

    def connect_timeout(self) -> float:
        timeout = getattr(self.server.source, "timeout_secs", None)
        return float(timeout) if timeout else CONNECT_TIMEOUT_SECS


class McpToolSource:
    """The `mcp` tool source. `config` is an `McpClientConfig`, a dict, or a JSON file path;
    without one, the file named by MCP_CONFIG_PATH (no servers when that is unset)."""

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = os.environ.get(ENV_CONFIG) or None
        self.config: McpClientConfig | None = as_mcp_config(config)
        self._conns: list[_Connection] = []
        self._tools: dict[str, tuple[_Connection, str, dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._closed = False
        if self.config is None or not self.config.enabled_servers():
            return
        _require_sdk()
        self._start()

    # -- life cycle -----------------------------------------------------------------------------
    def _start(self) -> None:
        assert self.config is not None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mistralrs-mcp", daemon=True)
        self._thread.start()
        self._conns = [_Connection(s) for s in self.config.enabled_servers()]
        limit = max(c.connect_timeout() for c in self._conns) + 10
        future = asyncio.run_coroutine_threadsafe(self._connect_all(), self._loop)
        try:
            future.result(limit)
        except BaseException:
            self.close()
            raise
        atexit.register(_close_at_exit, weakref.ref(self))
        for conn in self._conns:
            if not conn.alive:
                continue
            for tool in conn.tools:
                name = exposed_name(conn.server.prefix, tool.name)
                if name in self._tools:
                    log.warning("MCP server %s: tool %s is listed twice; keeping the first", conn.label, tool.name)
                    continue
                self._tools[name] = (conn, tool.name, openai_tool(name, tool, conn.server))
        connected = sum(c.alive for c in self._conns)
        log.info("MCP: %d of %d server(s) connected, %d tool(s)", connected, len(self._conns), len(self._tools))

    async def _connect_all(self) -> None:
        assert self.config is not None
        self._semaphore = asyncio.Semaphore(self.config.concurrency)
        await asyncio.gather(*(self._open(c) for c in self._conns))

    async def _open(self, conn: _Connection) -> None:
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        conn.stop = asyncio.Event()
        conn.task = asyncio.create_task(self._hold(conn, ready), name=f"mcp-{conn.server.id}")
        timeout = conn.connect_timeout()
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except asyncio.TimeoutError:
            conn.task.cancel()
            with contextlib.suppress(BaseException):
                await conn.task
            log.warning("MCP server %s did not answer within %gs; its tools are not available", conn.label, timeout)
        except Exception as exc:  # noqa: BLE001 - one failing server is a warning
            log.warning("MCP server %s failed to start: %s; its tools are not available", conn.label, describe(exc))

    async def _hold(self, conn: _Connection, ready: asyncio.Future) -> None:
        from mcp import Client

        try:
            async with self._transport(conn.server) as transport, \
                    Client(transport, mode="legacy", cache=None) as client:
                tools = await _list_tools(client)
                conn.client, conn.tools, conn.alive = client, tools, True
                ready.set_result(None)
                assert conn.stop is not None
                await conn.stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to _open or as a warning
            if not ready.done():
                ready.set_exception(exc)
            elif conn.stop is not None and not conn.stop.is_set():
                log.warning("MCP server %s disconnected: %s", conn.label, describe(exc))
        finally:
            conn.alive = False

    @contextlib.asynccontextmanager
    async def _transport(self, server: McpServerConfig) -> AsyncIterator[Any]:
        source = server.source
        if isinstance(source, McpServerSource.Process):
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            params = StdioServerParameters(command=source.command, args=list(source.args), env=source.env,
                                           cwd=source.work_dir)
            async with stdio_client(params) as streams:
                yield _Streams(streams)
            return
        headers = dict(source.headers or {})
        if server.bearer_token:
            headers["Authorization"] = f"Bearer {server.bearer_token}"
        if isinstance(source, McpServerSource.Http):
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            timeout = httpx2.Timeout(source.timeout_secs or CONNECT_TIMEOUT_SECS, read=300.0)
            async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http, \
                    streamable_http_client(source.url, http_client=http) as streams:
                yield _Streams(streams)
            return
        from mistralrs_plugins.tools.mcp.websocket import websocket_client

        async with websocket_client(source.url, headers=headers,
                                    timeout=source.timeout_secs or CONNECT_TIMEOUT_SECS) as streams:
            yield _Streams(streams)

    def close(self) -> None:
        """End every session (stdio children stop) and the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def stop_all() -> None:
            for conn in self._conns:
                if conn.stop is not None:
                    conn.stop.set()
            tasks = [c.task for c in self._conns if c.task is not None]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=10)
                for task in pending:
                    task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), loop).result(20)
        except Exception as exc:  # noqa: BLE001 - shutting down
            log.warning("MCP: closing the sessions failed: %s", describe(exc))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    # -- the tool-source interface --------------------------------------------------------------
    def list_tools(self) -> list[dict[str, Any]]:
        return [entry[2] for entry in self._tools.values()]

    def offered_tools(self) -> list[dict[str, Any]]:
        """All tools with `auto_register_tools` (else none: they are listed and callable, not offered)."""
        return self.list_tools() if self.config is not None and self.config.auto_register_tools else []

    def info(self) -> dict[str, Any]:
        return {"mcp_tools_count": len(self._tools), "mcp_servers_connected": sum(c.alive for c in self._conns)}

    def servers(self) -> list[dict[str, Any]]:
        """Each configured server: id, name, whether it is connected, its tools."""
        out = []
        for server in (self.config.servers if self.config is not None else []):
            conn = next((c for c in self._conns if c.server is server), None)
            out.append({"id": server.id, "name": server.name, "enabled": server.enabled,
                        "connected": bool(conn and conn.alive),
                        "tools": [n for n, (c, _, _) in self._tools.items() if c is conn]})
        return out

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        entry = self._tools.get(name)
        if entry is None:
            raise NotFoundError(f"no MCP tool named {name!r}")
        conn, tool, _ = entry
        if not conn.alive or self._loop is None:
            raise McpToolError(f"MCP server {conn.label} is not connected")
        assert self.config is not None
        timeout = self.config.timeout
        future = asyncio.run_coroutine_threadsafe(self._call(conn, tool, arguments, timeout), self._loop)
        done, _ = concurrent.futures.wait([future], timeout * 2 + 30)  # the call times out first
        if not done:
            future.cancel()
            raise McpToolError(f"MCP tool {tool!r} on server {conn.label} did not finish in {timeout:g}s")
        return future.result()

    async def _call(self, conn: _Connection, tool: str, arguments: dict[str, Any], timeout: float) -> str:
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED

        assert self._semaphore is not None
        async with self._semaphore:
            try:
                result = await asyncio.wait_for(conn.client.call_tool(tool, arguments), timeout)
            except asyncio.TimeoutError:
                raise McpToolError(f"MCP tool {tool!r} on server {conn.label} timed out after {timeout:g}s "
                                   "(tool_timeout_secs)") from None
            except MCPError as exc:
                if exc.code == CONNECTION_CLOSED:
                    self._lost(conn, exc)
                    raise McpToolError(f"MCP server {conn.label} is gone ({exc.message})") from None
                raise McpToolError(f"MCP server {conn.label}: {exc.message}") from None
            except (OSError, EOFError) as exc:
                self._lost(conn, exc)
                raise McpToolError(f"MCP server {conn.label} is gone ({describe(exc)})") from None
        return result_text(result)

    def _lost(self, conn: _Connection, exc: BaseException) -> None:
        if conn.alive:
            conn.alive = False
            log.warning("MCP server %s died (%s); its tools now return errors", conn.label, describe(exc))


def _close_at_exit(ref: Any) -> None:
    source = ref()
    if source is not None:
        source.close()


class _Streams:
    """A ready pair of streams as an SDK `Transport` (an async context manager yielding them)."""

    def __init__(self, streams: Any) -> None:
        self.streams = streams

    async def __aenter__(self) -> Any:
        return self.streams

    async def __aexit__(self, *exc: Any) -> None:
        return None


async def _list_tools(client: Any) -> list[Any]:
    tools: list[Any] = []
    cursor = None
    for _ in range(100):  # a paginator that never ends cannot hang the start
        result = await client.list_tools(cursor=cursor) if cursor else await client.list_tools()
        tools.extend(result.tools)
        cursor = result.next_cursor
        if not cursor:
            break
    return tools
