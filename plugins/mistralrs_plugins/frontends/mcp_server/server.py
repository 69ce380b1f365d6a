"""`McpServer`: the served models as MCP tools, over the official `mcp` SDK's streamable HTTP
transport at `/mcp` (stateless, JSON responses: a plain `curl -X POST .../mcp` with one JSON-RPC
request works, and so does the SDK's `Client`).

* `initialize` answers `serverInfo.name` "mistralrs" with the `tools` capability; `ping`;
* `tools/list`: a `chat` tool for the default model, plus `chat_<model>` per model when several
  are served; the input schema is the chat-completion request (the OpenAPI document's);
* `tools/call`: the arguments are a chat-completion request; it runs through the same
  `prepare_chat` → `ToolLoop` → engine path as `POST /v1/chat/completions` (server-side tools
  included) and returns the assistant's answer as text content.

Errors (JSON-RPC): -32601 unknown method and -32600 malformed request (the SDK's), -32602 an
unknown tool or invalid chat arguments (naming the field), -32603 a failed generation or a model
that is still loading.

It runs uvicorn on its own asyncio loop in a daemon thread ("mistralrs-mcp-server") and submits
to the shared engine with that loop, so it never blocks the OpenAI server's event loop.
`state` is the OpenAI server's `ServerState` (or anything with `model_id`, `model_ids`,
`services`, `tools`, `draining`, `submit_chat` and `release`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import socket
import threading
import time
import uuid
from typing import Any

from mistralrs import protocol as P
from mistralrs.errors import ConfigError, MistralRsError

log = logging.getLogger("mistralrs.mcp_server")

SERVER_NAME = "mistralrs"
PATH = "/mcp"


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", model_id).strip("_") or "model"


def tool_models(default: str, model_ids: list[str]) -> dict[str, str | None]:
    """Tool name -> the model it chats with (None: the default, or the request's `model`)."""
    tools: dict[str, str | None] = {"chat": None}
    if len(model_ids) > 1:
        for model in model_ids:
            name = f"chat_{_slug(model)}"
            while name in tools:
                name += "_"
            tools[name] = model
    return tools


def chat_schema(per_model: bool) -> dict[str, Any]:
    """The chat-completion request's JSON schema (streaming fields dropped; `model` too for a
    tool bound to one model)."""
    from mistralrs_plugins.frontends.openai_server.openapi import SCHEMAS

    schema = copy.deepcopy(SCHEMAS["ChatCompletionRequest"])
    for key in ("stream", "stream_options") + (("model",) if per_model else ()):
        schema["properties"].pop(key, None)
    return schema


def answer_text(response: Any) -> str:
    """The text of a chat response's first choice (its tool calls as JSON when it has no text)."""
    message = response.choices[0].message
    if message.content:
        return message.content
    if message.tool_calls:
        return json.dumps([{"name": c.function.name, "arguments": c.function.arguments}
                           for c in message.tool_calls], ensure_ascii=False)
    return ""


class McpServer:
    """The `mcp_server` frontend: `start()` listens (port 0 picks a free port), `close()` stops."""

    def __init__(self, state: Any, *, host: str = "0.0.0.0", port: int = 8081) -> None:
        try:
            import mcp  # noqa: F401
        except ImportError:
            raise ConfigError("the MCP server (--mcp-port) needs the `mcp` package: "
                              "pip install 'mistralrs[mcp]'") from None
        self.state = state
        self.host, self.port = host, port
        self.tools = tool_models(state.model_id, list(state.model_ids))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", None) else self.host
        return f"http://{host}:{self.port}{PATH}"

    # -- the MCP handlers -----------------------------------------------------------------------
    def _lowlevel(self) -> Any:
        import mcp_types as types
        from mcp.server import Server

        import mistralrs

        async def list_tools(ctx: Any, params: Any) -> Any:
            return types.ListToolsResult(tools=[
                types.Tool(name=name, description=self._description(model), input_schema=chat_schema(model is not None))
                for name, model in self.tools.items()])

        async def call_tool(ctx: Any, params: Any) -> Any:
            text = await self.call(params.name, dict(params.arguments or {}))
            return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

        return Server(SERVER_NAME, version=getattr(mistralrs, "__version__", "0.1.0"),
                      instructions="use the tool 'chat' (arguments: an OpenAI chat-completion request)",
                      on_list_tools=list_tools, on_call_tool=call_tool)

    def _description(self, model: str | None) -> str:
        who = model or f"the default model ({self.state.model_id})"
        extra = "" if model or len(self.state.model_ids) == 1 else "; `model` picks another served model"
        return (f"Chat with {who}: the arguments are an OpenAI chat-completion request (messages, sampling "
                f"fields, tools, tool_choice, ...){extra}. Returns the assistant's answer as text.")

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Run the `chat` tool `name`; errors are `MCPError`s with the codes the docstring lists."""
        from mcp.shared.exceptions import MCPError
        from mcp_types import INTERNAL_ERROR, INVALID_PARAMS

        if name not in self.tools:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name} (tools: {', '.join(self.tools)})")
        body = dict(arguments)
        body.pop("stream", None)
        body.pop("stream_options", None)
        if self.tools[name] is not None:
            body["model"] = self.tools[name]
        try:
            return await self._chat(body)
        except MCPError:
            raise
        except MistralRsError as exc:
            if exc.http_status == 400 or exc.http_status == 404:
                raise MCPError(code=INVALID_PARAMS, message=str(exc)) from None
            raise MCPError(code=INTERNAL_ERROR, message=f"chat failed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - one failed call, reported to its caller
            log.exception("MCP chat call failed")
            raise MCPError(code=INTERNAL_ERROR, message=f"chat failed: {type(exc).__name__}: {exc}") from None

    async def _chat(self, body: dict[str, Any]) -> str:
        from mcp.shared.exceptions import MCPError
        from mcp_types import INTERNAL_ERROR, INVALID_PARAMS

        from mistralrs.chat_plan import prepare_chat

        state = self.state
        if state.draining:
            raise MCPError(code=INTERNAL_ERROR, message="the server is shutting down")
        model = body.get("model")
        name = state.model_id if model in (None, "default") else model
        if name not in state.model_ids:
            served = ", ".join(repr(m) for m in state.model_ids)
            raise MCPError(code=INVALID_PARAMS, message=f"the model {model!r} does not exist; this server serves "
                                                        f"{served} (or use \"default\")")
        service = state.services.get(name)
        if service is None:
            raise MCPError(code=INTERNAL_ERROR, message=f"the model {name} is still loading; retry shortly")
        plan = await asyncio.to_thread(prepare_chat, service, body, state.tools)
        handle = state.submit_chat(service, plan)
        try:
            done, _ = await P.acollect(handle)
        finally:
            if not getattr(handle, "done", True):
                handle.cancel()
            state.release(handle)
        response = P.chat_response(service.tokenizer, done, id=f"chatcmpl-{uuid.uuid4().hex}", model=name,
                                   logprobs=False, token_logprobs={}, plan=plan, records=plan.records)
        return answer_text(response)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Listen on host:port and serve in a background thread; a busy port is a ConfigError."""
        import uvicorn

        app = self._lowlevel().streamable_http_app(streamable_http_path=PATH, stateless_http=True,
                                                   json_response=True, host=self.host)
        family = socket.AF_INET6 if ":" in (self.host or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--mcp-port: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)

        def serve() -> None:
            try:
                asyncio.run(self._server.serve(sockets=[sock]))
            except BaseException as exc:  # noqa: BLE001 - reported by start() or close()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="mistralrs-mcp-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise ConfigError(f"--mcp-port: the MCP server did not start on {self.host}:{self.port}"
                                  + (f": {self._error}" if self._error else ""))
            time.sleep(0.01)
        log.info("MCP server on %s", self.url)

    def close(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
