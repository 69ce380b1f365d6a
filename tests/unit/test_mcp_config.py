"""The MCP client config (mistral.rs's JSON schema): what it accepts, and one-line errors naming
the key for what it does not. No MCP server is started here."""

from __future__ import annotations

import json

import pytest

from mistralrs.errors import ConfigError
from mistralrs.mcp_config import (
    McpClientConfig,
    McpServerConfig,
    McpServerSource,
    as_mcp_config,
    load_mcp_config,
    mcp_config_from_dict,
)

GOOD = {
    "servers": [
        {"id": "fs-1", "name": "filesystem", "enabled": True, "tool_prefix": "fs", "bearer_token": None,
         "resources": ["file://**"],
         "source": {"type": "Process", "command": "npx", "args": ["-y", "server"], "env": {"K": "V"},
                    "work_dir": "/tmp"}},
        {"id": "web", "name": "web", "tool_prefix": "web", "bearer_token": "tok",
         "source": {"type": "Http", "url": "https://example.invalid/mcp", "timeout_secs": 5,
                    "headers": {"X-A": "b"}}},
        {"id": "ws", "name": "ws", "enabled": False,
         "source": {"type": "WebSocket", "url": "ws://127.0.0.1:1/mcp"}},
    ],
    "auto_register_tools": True, "tool_timeout_secs": 30, "max_concurrent_calls": 4,
}


def test_the_reference_schema_is_read():
    cfg = mcp_config_from_dict(GOOD, "mcp.json")
    fs, web, ws = cfg.servers
    assert fs.source == McpServerSource.Process(command="npx", args=["-y", "server"], env={"K": "V"}, work_dir="/tmp")
    assert fs.resources == ["file://**"] and fs.prefix == "fs"
    assert web.source == McpServerSource.Http(url="https://example.invalid/mcp", timeout_secs=5, headers={"X-A": "b"})
    assert web.bearer_token == "tok"
    assert isinstance(ws.source, McpServerSource.WebSocket) and not ws.enabled
    assert [s.id for s in cfg.enabled_servers()] == ["fs-1", "web"]
    assert cfg.timeout == 30.0 and cfg.concurrency == 4
    # No prefix: mistral.rs's `mcp_<uuid>`, stable for the config's life.
    assert ws.prefix.startswith("mcp_") and ws.prefix == ws.prefix and len(ws.prefix) > 8


def test_defaults():
    cfg = mcp_config_from_dict({"servers": [], "auto_register_tools": False})
    assert cfg.timeout == 30.0 and cfg.concurrency == 10 and not cfg.auto_register_tools


def _bad(mutate) -> str:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(ConfigError) as err:
        mcp_config_from_dict(data, "mcp.json")
    message = str(err.value)
    assert "\n" not in message and message.startswith("mcp.json: ")
    return message


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("auto_register_tools"), "auto_register_tools: required key missing"),
    (lambda d: d.pop("servers"), "servers: required key missing"),
    (lambda d: d["servers"][0]["source"].update(type="Pipe"),
     'servers[0].source.type: unknown source type "Pipe" (expected Process, Http, WebSocket)'),
    (lambda d: d["servers"][1].update(tool_prefix="fs"),
     "servers[1].tool_prefix: duplicate prefix 'fs', already used by servers[0]"),
    (lambda d: d["servers"][1].update(id="fs-1"), "servers[1].id: 'fs-1' is already the id of servers[0]"),
    (lambda d: d["servers"][0].update(colour="red"), "servers[0]: unknown key(s) colour"),
    (lambda d: d.update(auto_register_tools="yes"), 'auto_register_tools: expected true or false, got "yes"'),
    (lambda d: d.update(tool_timeout_secs=0), "tool_timeout_secs: must be > 0, got 0"),
    (lambda d: d.update(max_concurrent_calls=2.5), "max_concurrent_calls: expected an integer, got 2.5"),
    (lambda d: d["servers"][0]["source"].pop("command"), "servers[0].source.command: required key missing"),
    (lambda d: d["servers"][0]["source"].update(args="x"), "servers[0].source.args: expected a list"),
    (lambda d: d["servers"][1]["source"].update(url="ftp://x"), "servers[1].source.url: a Http source needs"),
    (lambda d: d["servers"][2]["source"].update(url="http://x"), "servers[2].source.url: a WebSocket source needs"),
    (lambda d: d["servers"][0].update(tool_prefix="a b"), "servers[0].tool_prefix: 'a b' must be"),
    (lambda d: d["servers"][0].pop("source"), "servers[0].source: required key missing"),
])
def test_bad_configs_are_one_line_errors_naming_the_key(mutate, expected):
    assert expected in _bad(mutate)


def test_files(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(GOOD))
    assert load_mcp_config(path).servers[0].id == "fs-1"
    assert as_mcp_config(str(path)).path == str(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"mcp.json: invalid JSON at line 1 column 2"):
        load_mcp_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_mcp_config(tmp_path / "missing.json")


def test_python_api_objects_are_checked_too():
    src = McpServerSource.Http(url="http://127.0.0.1:1/mcp")
    cfg = McpClientConfig(servers=[McpServerConfig(id="a", name="a", source=src, tool_prefix="p"),
                                   McpServerConfig(id="b", name="b", source=src, tool_prefix="p")])
    with pytest.raises(ConfigError, match=r"servers\[1\].tool_prefix: duplicate prefix 'p'"):
        as_mcp_config(cfg)
    with pytest.raises(ConfigError, match="mcp_client_config must be"):
        as_mcp_config(42)
    # mistral.rs's Python names
    from mistralrs import McpClientConfigPy, McpServerConfigPy, McpServerSourcePy

    assert McpClientConfigPy is McpClientConfig and McpServerConfigPy is McpServerConfig
    assert McpServerSourcePy.Process is McpServerSource.Process


def test_toml_mcp_settings(tmp_path):
    from mistralrs.config import load_config

    base = '[[models]]\nmodel_id = "m"\n'
    path = tmp_path / "c.toml"
    path.write_text('[runtime]\nmcp_config = "mcp.json"\n[server]\nport = 1234\nmcp_port = 8081\n' + base)
    cfg = load_config(path)
    assert cfg.runtime.mcp_config == "mcp.json" and cfg.server.mcp_port == 8081
    path.write_text('[server]\nport = 1234\nmcp_port = 1234\n' + base)
    with pytest.raises(ConfigError, match=r"\[server\] mcp_port must be a port number .* other than \[server\] port"):
        load_config(path)


def test_build_toolbox_refuses_unknown_sources_and_needs_the_mcp_source():
    from mistralrs.tools import build_toolbox

    class Catalogue(list):
        def names(self):
            return [s.name for s in self]

    class Registry:
        tool_sources = Catalogue()

    assert build_toolbox(Registry(), None) is None
    with pytest.raises(ConfigError, match="--enable-tool-sources: no tool source named nope"):
        build_toolbox(Registry(), "nope", flag="--enable-tool-sources")
    with pytest.raises(ConfigError, match="needs the 'mcp' tool source"):
        build_toolbox(Registry(), None, mcp_config={"servers": [], "auto_register_tools": True})
