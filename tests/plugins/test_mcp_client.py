"""The `mcp` tool source against real MCP servers written with the official SDK: a stdio child
process (tests/helpers/mcp_adder_server.py), the same server over streamable HTTP, and over a
WebSocket. Tools, calls, errors fed back as results, timeouts, the concurrency cap, a server that
fails to start or dies, and child processes stopped on close."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mistralrs.plugins import get_registry  # noqa: E402
from mistralrs.tool_choice import ToolConfig  # noqa: E402
from mistralrs.tools import build_toolbox  # noqa: E402

ADDER = Path(__file__).resolve().parents[1] / "helpers" / "mcp_adder_server.py"


def process_server(record: Path, **extra) -> dict:
    return {"id": "adder-1", "name": "adder", "tool_prefix": "calc",
            "source": {"type": "Process", "command": sys.executable, "args": [str(ADDER)],
                       "env": {"MCP_TEST_RECORD": str(record)}}, **extra}


def config(*servers: dict, **top) -> dict:
    return {"servers": list(servers), "auto_register_tools": True, "tool_timeout_secs": 10, **top}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def child_pid(path: Path) -> int:
    deadline = time.time() + 10
    while time.time() < deadline:
        started = [r for r in records(path) if r["tool"] == "started"]
        if started:
            return started[-1]["arguments"]["pid"]
        time.sleep(0.05)
    raise AssertionError("the MCP server did not record its pid")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def record(tmp_path) -> Path:
    return tmp_path / "calls.jsonl"


def test_stdio_server_tools_are_offered_and_called(record):
    box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record)))
    try:
        tools = {t["function"]["name"]: t["function"] for t in box.offered_tools()}
        assert set(tools) == {"calc_add", "calc_slow"}
        add = tools["calc_add"]
        assert add["strict"] is True and add["description"] == "Add two integers."
        assert add["parameters"]["properties"]["a"]["maximum"] == 99 and add["parameters"]["required"] == ["a", "b"]
        assert box.source_of("calc_add") == "mcp"
        assert box.info() == {"mcp_tools_count": 2, "mcp_servers_connected": 1}
        assert box.call("calc_add", {"a": 2, "b": 40}) == "42"
        assert box.call("calc_add", '{"a": -5, "b": 3}') == "-2"
        assert [r["arguments"] for r in records(record) if r["tool"] == "add"] == [{"a": 2, "b": 40}, {"a": -5, "b": 3}]
        tools_config = ToolConfig(toolbox=box)
        assert tools_config.status() == {"tools_available": True, "mcp_tools_count": 2, "mcp_servers_connected": 1}
    finally:
        box.close()


def test_bad_arguments_and_timeouts_become_error_results(record):
    box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record), tool_timeout_secs=1))
    tools = ToolConfig(toolbox=box)
    try:
        # What the tool loop feeds back to the model: text, never an exception.
        invalid = tools.call("calc_add", '{"a": "x"}')
        assert invalid.startswith("error: ") and "validation error" in invalid
        assert tools.call("calc_add", "{not json").startswith("error: the arguments are not valid JSON")
        started = time.monotonic()
        slow = tools.call("calc_slow", '{"seconds": 5}')
        assert time.monotonic() - started < 4
        assert slow.startswith("error: McpToolError: MCP tool 'slow' on server 'adder' (id adder-1) timed out after 1s")
        assert tools.call("calc_add", '{"a": 1, "b": 1}') == "2"  # the session survives a timed-out call
    finally:
        box.close()


@pytest.mark.parametrize("cap, minimum, maximum", [(1, 1.9, 10.0), (2, 0.0, 1.9)])
def test_max_concurrent_calls_caps_calls_in_flight(record, cap, minimum, maximum):
    box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record), max_concurrent_calls=cap))
    try:
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(box.call("calc_slow", {"seconds": 1})))
                   for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == ["done", "done"]
        assert minimum <= time.monotonic() - started < maximum
    finally:
        box.close()


def test_failing_and_dying_servers_are_warnings_naming_them(record, tmp_path, caplog):
    broken = {"id": "broken-1", "name": "broken", "tool_prefix": "bad",
              "source": {"type": "Process", "command": str(tmp_path / "no-such-program")}}
    with caplog.at_level(logging.WARNING, logger="mistralrs.mcp"):
        box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record), broken))
    try:
        assert "MCP server 'broken' (id broken-1) failed to start: FileNotFoundError" in caplog.text
        assert box.info() == {"mcp_tools_count": 2, "mcp_servers_connected": 1}  # the rest works
        assert box.call("calc_add", {"a": 1, "b": 2}) == "3"
        pid = child_pid(record)
        os.kill(pid, signal.SIGKILL)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mistralrs.mcp"):
            result = ToolConfig(toolbox=box).call("calc_add", '{"a": 1, "b": 2}')
        assert result.startswith("error: McpToolError: MCP server 'adder' (id adder-1) is gone")
        assert "MCP server 'adder' (id adder-1) died" in caplog.text
        assert box.info()["mcp_servers_connected"] == 0
        again = ToolConfig(toolbox=box).call("calc_add", '{"a": 1, "b": 2}')
        assert again == "error: McpToolError: MCP server 'adder' (id adder-1) is not connected"
    finally:
        box.close()


def test_close_stops_the_child_processes(record):
    box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record)))
    pid = child_pid(record)
    assert alive(pid)
    box.close()
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    box.close()  # idempotent


def test_auto_register_tools_false_lists_but_does_not_offer(record):
    box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record), auto_register_tools=False))
    try:
        assert [t["function"]["name"] for t in box.list_tools()] == ["calc_add", "calc_slow"]
        assert box.offered_tools() == []
        assert ToolConfig(toolbox=box).toolbox_tools() == []
        assert box.call("calc_add", {"a": 1, "b": 1}) == "2"
    finally:
        box.close()


def test_disabled_servers_are_not_started(record):
    box = build_toolbox(get_registry(), None, mcp_config=config(process_server(record, enabled=False)))
    try:
        assert box.list_tools() == [] and box.info() == {"mcp_tools_count": 0, "mcp_servers_connected": 0}
        assert not record.exists()
    finally:
        box.close()


# -- the same server over HTTP and WebSocket --------------------------------------------------------
class Uvicorn:
    def __init__(self, app) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_http_source_with_headers_and_bearer_token(record, monkeypatch):
    monkeypatch.setenv("MCP_TEST_RECORD", str(record))
    from tests.helpers.mcp_adder_server import server as adder

    seen: list[dict] = []
    app = adder.streamable_http_app(host="127.0.0.1")

    async def spy(scope, receive, send):
        if scope["type"] == "http":
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    http = Uvicorn(spy)
    try:
        server = {"id": "h", "name": "adder-http", "tool_prefix": "h", "bearer_token": "s3cret",
                  "source": {"type": "Http", "url": f"http://127.0.0.1:{http.port}/mcp", "timeout_secs": 10,
                             "headers": {"X-Test": "yes"}}}
        box = build_toolbox(get_registry(), None, mcp_config=config(server))
        try:
            assert box.call("h_add", {"a": 20, "b": 22}) == "42"
        finally:
            box.close()
        assert seen and all(h.get("authorization") == "Bearer s3cret" and h.get("x-test") == "yes" for h in seen)
    finally:
        http.stop()


def test_websocket_source(record, monkeypatch):
    monkeypatch.setenv("MCP_TEST_RECORD", str(record))
    import anyio
    import mcp_types as types
    from aiohttp import WSMsgType, web
    from mcp.shared.message import SessionMessage

    from tests.helpers.mcp_adder_server import server as adder

    lowlevel = adder._lowlevel_server

    async def handler(request):
        ws = web.WebSocketResponse(protocols=("mcp",))
        await ws.prepare(request)
        read_writer, read_stream = anyio.create_memory_object_stream(0)
        write_stream, write_reader = anyio.create_memory_object_stream(0)

        async def pump_in():
            async with read_writer:
                async for frame in ws:
                    if frame.type == WSMsgType.TEXT:
                        await read_writer.send(SessionMessage(types.jsonrpc_message_adapter.validate_json(frame.data)))

        async def pump_out():
            async with write_reader:
                async for message in write_reader:
                    await ws.send_str(message.message.model_dump_json(by_alias=True, exclude_unset=True))

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump_in)
            tg.start_soon(pump_out)
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
            tg.cancel_scope.cancel()
        return ws

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_get("/mcp", handler)
    runner = web.AppRunner(app)

    async def start():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(20)
    try:
        server = {"id": "w", "name": "adder-ws", "tool_prefix": "w",
                  "source": {"type": "WebSocket", "url": f"ws://127.0.0.1:{port}/mcp"}}
        box = build_toolbox(get_registry(), None, mcp_config=config(server))
        try:
            assert box.info() == {"mcp_tools_count": 2, "mcp_servers_connected": 1}
            assert box.call("w_add", {"a": 7, "b": 8}) == "15"
        finally:
            box.close()
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
