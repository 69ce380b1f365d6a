"""MCP end to end on a tiny random-weight model, both directions, with the official `mcp` SDK on
the other side:

* client: a stdio MCP server written with the SDK (tests/helpers/mcp_adder_server.py, whose tools
  record their arguments to a file) connected through a config file / `McpClientConfig`; the
  model is forced with `tool_choice` naming `calc_add`, the tool really runs (the file is
  written), its result is fed back and the conversation ends in a final assistant message
  (Python API, HTTP server, `mistralrs serve --mcp-config`, `from-config` with `[runtime]
  mcp_config`);
* server: the SDK's client against `--mcp-port`: initialize, ping, tools/list, tools/call, an
  unknown tool and invalid arguments, while chat completions go on over the HTTP port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from tests.e2e.conftest import start_server  # noqa: E402
from tests.helpers.tiny_models import write_tiny_llama  # noqa: E402

ADDER = Path(__file__).resolve().parents[1] / "helpers" / "mcp_adder_server.py"
FORCE_ADD = {"type": "function", "function": {"name": "calc_add"}}


def write_config(path: Path, record: Path) -> Path:
    path.write_text(json.dumps({
        "servers": [{"id": "adder-1", "name": "adder", "tool_prefix": "calc",
                     "source": {"type": "Process", "command": sys.executable, "args": [str(ADDER)],
                                "env": {"MCP_TEST_RECORD": str(record)}}}],
        "auto_register_tools": True, "tool_timeout_secs": 20, "max_concurrent_calls": 4}))
    return path


def records(path: Path, tool: str = "add") -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["arguments"] for r in map(json.loads, lines) if r["tool"] == tool]


def check_round(records_before: int, record: Path, agentic: list, message: dict | object) -> None:
    """One server-side call of calc_add ran with the arguments the model wrote, its result was
    fed back, and the answer is a final assistant message (no further call)."""
    (call,) = agentic[:1]
    name = call["name"] if isinstance(call, dict) else call.name
    arguments = json.loads(call["arguments"] if isinstance(call, dict) else call.arguments)
    result = call["result_content"] if isinstance(call, dict) else call.result_content
    assert name == "calc_add"
    assert records(record)[records_before] == arguments  # the MCP server's tool really ran
    assert result == str(arguments["a"] + arguments["b"])
    tool_calls = message["tool_calls"] if isinstance(message, dict) else message.tool_calls
    assert not tool_calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Tool schemas and a round of results need more context than the shared model's 512.
    return write_tiny_llama(tmp_path_factory.mktemp("mcp-model") / "tiny-llama", max_position_embeddings=2048)


# -- the Python API --------------------------------------------------------------------------------
def test_runner_with_an_mcp_client_config(model_dir, tmp_path):
    from mistralrs import ChatCompletionRequest, McpClientConfig, McpServerConfig, McpServerSource, Runner, Which

    record = tmp_path / "calls.jsonl"
    config = McpClientConfig(
        servers=[McpServerConfig(id="adder-1", name="adder", tool_prefix="calc", source=McpServerSource.Process(
            command=sys.executable, args=[str(ADDER)], env={"MCP_TEST_RECORD": str(record)}))],
        auto_register_tools=True, tool_timeout_secs=20)
    runner = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_blk_size=16, pa_ctxt_len=8192,
                    mcp_client_config=config)
    try:
        assert runner.tools.status() == {"tools_available": True, "mcp_tools_count": 2, "mcp_servers_connected": 1}
        for stream in (False, True):
            before = len(records(record))
            req = ChatCompletionRequest(messages="What is 2 + 3?", max_tokens=40, seed=1, tool_choice=FORCE_ADD,
                                        stream=stream)
            res = runner.send_chat_completion_request(req)
            if stream:
                chunks = list(res)
                finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
                assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
                check_round(before, record, finish.agentic_tool_calls, finish.choices[0].delta)
            else:
                assert res.choices[0].finish_reason in ("stop", "length")
                check_round(before, record, res.agentic_tool_calls, res.choices[0].message)
    finally:
        runner.shutdown()
    pid = next(json.loads(line)["arguments"]["pid"] for line in record.read_text().splitlines()
               if json.loads(line)["tool"] == "started")
    assert not pid_alive(pid)  # shutdown stopped the stdio server


def pid_alive(pid: int, wait: float = 10.0) -> bool:
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


# -- the HTTP server with an MCP client and an MCP server --------------------------------------------
@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    from mistralrs.plugins import get_registry
    from mistralrs.serving import ModelService, ServiceOptions
    from mistralrs.tool_choice import ToolConfig
    from mistralrs.tools import build_toolbox

    root = tmp_path_factory.mktemp("mcp-served")
    record = root / "calls.jsonl"
    tools = ToolConfig(toolbox=build_toolbox(get_registry(), None, mcp_config=str(write_config(root / "mcp.json",
                                                                                                 record))))
    service = ModelService(ServiceOptions(model_id=str(model_dir), dtype="f32", max_seqs=8, pa_blk_size=16,
                                          pa_context_len=8192))
    srv = start_server(service, tools=tools, mcp_port=0)
    yield srv, record
    srv.stop()
    tools.close()
    service.shutdown()


def http(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_models_report_the_mcp_tools(served):
    srv, _ = served
    cards = http(srv.url + "/v1/models")["data"]
    assert all(c["tools_available"] is True and c["mcp_tools_count"] == 2 and c["mcp_servers_connected"] == 1
               for c in cards)


def test_http_chat_runs_the_mcp_tool(served):
    srv, record = served
    before = len(records(record))
    res = http(srv.url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 40, "seed": 3,
        "tool_choice": FORCE_ADD})
    check_round(before, record, res["agentic_tool_calls"], res["choices"][0]["message"])


def sdk(url: str, work, mode: str = "legacy"):
    from mcp import Client

    async def main():
        async with Client(url, mode=mode) as client:
            return await work(client)

    return asyncio.run(main())


def test_sdk_client_initialize_ping_list_call(served):
    import warnings

    srv, _ = served
    url = srv.server.mcp.url
    assert url.endswith("/mcp")

    async def work(client):
        assert client.server_info.name == "mistralrs"
        assert client.server_capabilities.tools is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ping is deprecated in the SDK's newest protocol version
            await client.send_ping()
        tools = (await client.list_tools()).tools
        result = await client.call_tool("chat", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                                                 "seed": 1})
        return tools, result

    tools, result = sdk(url, work)
    assert [t.name for t in tools] == ["chat"]
    schema = tools[0].input_schema
    assert schema["required"] == ["messages"] and "temperature" in schema["properties"]
    assert "stream" not in schema["properties"]
    assert not result.is_error and result.content[0].type == "text" and isinstance(result.content[0].text, str)
    assert result.content[0].text  # 8 random tokens of text


def test_sdk_client_errors(served):
    from mcp.shared.exceptions import MCPError

    srv, _ = served

    async def work(client):
        errors = {}
        for name, args in (("nope", {"messages": "hi"}), ("chat", {"max_tokens": 3}),
                           ("chat", {"messages": "hi", "temperature": -1})):
            try:
                await client.call_tool(name, args)
            except MCPError as exc:
                errors[(name, tuple(args))] = (exc.code, exc.message)
        return errors

    errors = sdk(srv.server.mcp.url, work)
    assert errors[("nope", ("messages",))] == (-32602, "Unknown tool: nope (tools: chat)")
    code, message = errors[("chat", ("max_tokens",))]
    assert code == -32602 and "messages" in message
    code, message = errors[("chat", ("messages", "temperature"))]
    assert code == -32602 and "temperature" in message


def test_mcp_calls_do_not_block_the_http_api(served):
    srv, _ = served
    done: dict[str, float] = {}

    async def work(client):
        result = await client.call_tool("chat", {"messages": "Tell me a long story", "max_tokens": 1400,
                                                 "ignore_eos": True, "seed": 2, "tool_choice": "none"})
        done["mcp"] = time.monotonic()
        return result

    thread = threading.Thread(target=lambda: sdk(srv.server.mcp.url, work, mode="auto"))
    thread.start()
    deadline = time.time() + 30
    while not srv.state.handles and time.time() < deadline:  # the MCP call is generating
        time.sleep(0.01)
    assert srv.state.handles
    res = http(srv.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    done["http"] = time.monotonic()
    thread.join(120)
    assert res["choices"][0]["message"]["role"] == "assistant"
    assert done["http"] < done["mcp"]  # the short HTTP request finished while the MCP call was generating


# -- the command line ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["serve", "from-config"])
def test_cli_mcp_client_and_server(how, model_dir, tmp_path):
    record = tmp_path / "calls.jsonl"
    config = write_config(tmp_path / "mcp.json", record)
    port, mcp_port = free_port(), free_port()
    if how == "serve":
        argv = ["serve", "-m", str(model_dir), "--dtype", "f32", "--host", "127.0.0.1", "--port", str(port),
                "--mcp-port", str(mcp_port), "--mcp-config", str(config), "--pa-context-len", "8192"]
    else:
        toml = tmp_path / "config.toml"
        toml.write_text(f'command = "serve"\n[server]\nhost = "127.0.0.1"\nport = {port}\nmcp_port = {mcp_port}\n'
                        f'[runtime]\nmcp_config = "mcp.json"\n[paged_attn]\ncontext_len = 8192\n'
                        f'[[models]]\nmodel_id = "{model_dir}"\ndtype = "f32"\n')
        argv = ["from-config", "-f", str(toml)]
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()  # 503 (an OSError) until loaded
                cards = http(url + "/v1/models")["data"]
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("server did not come up: " + (proc.stdout.read() if proc.stdout else ""))
                time.sleep(0.3)
        assert cards[0]["mcp_tools_count"] == 2 and cards[0]["mcp_servers_connected"] == 1
        res = http(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "2 + 3?"}],
                                                  "max_tokens": 40, "seed": 3, "tool_choice": FORCE_ADD})
        check_round(0, record, res["agentic_tool_calls"], res["choices"][0]["message"])

        async def work(client):
            return [t.name for t in (await client.list_tools()).tools]

        assert sdk(f"http://127.0.0.1:{mcp_port}/mcp", work) == ["chat"]
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert f"MCP server on http://127.0.0.1:{mcp_port}/mcp" in output
    pid = json.loads(record.read_text().splitlines()[0])["arguments"]["pid"]
    assert not pid_alive(pid), "the stdio MCP server outlived the server"


def test_cli_bad_mcp_config_is_one_line(tmp_path, model_dir):
    bad = tmp_path / "mcp.json"
    bad.write_text(json.dumps({"servers": [{"id": "a", "name": "a", "source": {"type": "Carrier-Pigeon"}}],
                               "auto_register_tools": True}))
    proc = subprocess.run([sys.executable, "-m", "mistralrs", "serve", "-m", str(model_dir), "--mcp-config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f'mistralrs: error: {bad}: servers[0].source.type: unknown source type '
                                   f'"Carrier-Pigeon" (expected Process, Http, WebSocket)')
    env = {**os.environ, "MCP_CONFIG_PATH": str(tmp_path / "missing.json")}
    proc = subprocess.run([sys.executable, "-m", "mistralrs", "tools", "list"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("missing.json does not exist")
