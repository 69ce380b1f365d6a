"""A WebSocket client transport for the `mcp` SDK (which ships stdio and streamable HTTP ones):
one JSON-RPC message per text frame, subprotocol `mcp`, over aiohttp. Messages are parsed and
serialised by the SDK's own types (`mcp_types.jsonrpc_message_adapter`, `SessionMessage`), as
the SDK's stdio transport does; this module only moves frames."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any


@contextlib.asynccontextmanager
async def websocket_client(url: str, *, headers: dict[str, str] | None = None,
                           timeout: float = 30.0) -> AsyncIterator[tuple[Any, Any]]:
    """Yields (read_stream, write_stream) of `SessionMessage`s, like the SDK's transports."""
    import aiohttp
    import anyio
    import mcp_types as types
    from mcp.shared.message import SessionMessage

    read_writer, read_stream = anyio.create_memory_object_stream[Any](0)
    write_stream, write_reader = anyio.create_memory_object_stream[Any](0)
    async with aiohttp.ClientSession(headers=headers or {}, timeout=aiohttp.ClientTimeout(connect=timeout)) as http, \
            http.ws_connect(url, protocols=("mcp",), heartbeat=30.0) as ws:

        async def reader() -> None:
            async with read_writer:
                async for frame in ws:
                    if frame.type == aiohttp.WSMsgType.TEXT:
                        try:
                            item: Any = SessionMessage(types.jsonrpc_message_adapter.validate_json(frame.data))
                        except ValueError as exc:
                            item = exc
                        await read_writer.send(item)
                    elif frame.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                        break

        async def writer() -> None:
            async with write_reader:
                async for message in write_reader:
                    await ws.send_str(message.message.model_dump_json(by_alias=True, exclude_unset=True))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            try:
                yield read_stream, write_stream
            finally:
                tg.cancel_scope.cancel()
