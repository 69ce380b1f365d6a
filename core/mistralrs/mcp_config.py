"""The MCP client configuration (mistral.rs's schema): which MCP servers to connect to as tool
sources, read from JSON (`--mcp-config`, `MCP_CONFIG_PATH`, `[runtime] mcp_config`) or built in
Python (`McpClientConfig`, `McpServerConfig`, `McpServerSource.Process|Http|WebSocket`).

    {"servers": [{"id": "fs-1", "name": "filesystem", "enabled": true, "tool_prefix": "fs",
                  "bearer_token": null, "resources": ["file://**"],
                  "source": {"type": "Process", "command": "npx", "args": ["..."],
                             "env": {"K": "V"}, "work_dir": "/path"}}],
     "auto_register_tools": true, "tool_timeout_secs": 30, "max_concurrent_calls": 10}

Only the schema lives here (the core never talks MCP): the `mcp` tool-source plugin connects
to the servers. Every error is one line naming the file and the key.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import attrs

from mistralrs.errors import ConfigError

DEFAULT_TOOL_TIMEOUT_SECS = 30.0
DEFAULT_MAX_CONCURRENT_CALLS = 10
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


class McpServerSource:
    """How to reach an MCP server (mistral.rs `McpServerSource`)."""

    @attrs.define(kw_only=True)
    class Process:
        """A child process spoken to over stdin/stdout."""

        command: str
        args: list[str] = attrs.field(factory=list)
        work_dir: str | None = None
        env: dict[str, str] | None = None

    @attrs.define(kw_only=True)
    class Http:
        """Streamable HTTP at `url`."""

        url: str
        timeout_secs: float | None = None
        headers: dict[str, str] | None = None

    @attrs.define(kw_only=True)
    class WebSocket:
        """A WebSocket at `url` (subprotocol `mcp`)."""

        url: str
        timeout_secs: float | None = None
        headers: dict[str, str] | None = None


Source = Union[McpServerSource.Process, McpServerSource.Http, McpServerSource.WebSocket]
SOURCE_TYPES: dict[str, type] = {"Process": McpServerSource.Process, "Http": McpServerSource.Http,
                                 "WebSocket": McpServerSource.WebSocket}


@attrs.define(kw_only=True)
class McpServerConfig:
    """One MCP server. Its tools are offered as `<tool_prefix>_<tool>` (prefix `mcp_<uuid>` when
    none is given); `bearer_token` goes into `Authorization` for Http and WebSocket sources;
    `resources` (URI globs) is kept for mistral.rs compatibility (resources are not offered to
    the model)."""

    id: str
    name: str
    source: Source
    enabled: bool = True
    tool_prefix: str | None = None
    resources: list[str] | None = None
    bearer_token: str | None = None

    @property
    def prefix(self) -> str:
        if self.tool_prefix is None:
            self.tool_prefix = f"mcp_{uuid.uuid4().hex}"
        return self.tool_prefix

    @property
    def label(self) -> str:
        return f"{self.name!r} (id {self.id})" if self.name != self.id else repr(self.id)


@attrs.define(kw_only=True)
class McpClientConfig:
    """The MCP client: its servers, whether their tools are offered to the model automatically,
    the per-call timeout and how many calls may run at once (across all servers)."""

    servers: list[McpServerConfig] = attrs.field(factory=list)
    auto_register_tools: bool = True
    tool_timeout_secs: float | None = None
    max_concurrent_calls: int | None = None
    path: str = attrs.field(default="mcp_client_config", eq=False)

    @property
    def timeout(self) -> float:
        return float(self.tool_timeout_secs) if self.tool_timeout_secs is not None else DEFAULT_TOOL_TIMEOUT_SECS

    @property
    def concurrency(self) -> int:
        return int(self.max_concurrent_calls) if self.max_concurrent_calls is not None else DEFAULT_MAX_CONCURRENT_CALLS

    def enabled_servers(self) -> list[McpServerConfig]:
        return [s for s in self.servers if s.enabled]


# -- reading ------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {message}")

    def object(self, value: Any, key: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> Mapping:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected an object, got {type(value).__name__}")
        unknown = sorted(k for k in value if k not in known)
        if unknown:
            raise self.fail(key, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
        for name in required:
            if name not in value:
                raise self.fail(_join(key, name), "required key missing")
        return value

    def get(self, obj: Mapping, key: str, name: str, kind: type | tuple[type, ...], default: Any = None,
            nullable: bool = True) -> Any:
        value = obj.get(name, default)
        if value is None and nullable:
            return None
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _kinds(kind))
        if not ok:
            raise self.fail(_join(key, name), f"expected {_kind_name(kind)}, got {json.dumps(value)}")
        return value

    def strings(self, obj: Mapping, key: str, name: str) -> list[str] | None:
        value = self.get(obj, key, name, list)
        if value is not None and not all(isinstance(v, str) for v in value):
            raise self.fail(_join(key, name), "expected a list of strings")
        return value

    def string_map(self, obj: Mapping, key: str, name: str) -> dict[str, str] | None:
        value = self.get(obj, key, name, dict)
        if value is not None and not all(isinstance(v, str) for v in value.values()):
            raise self.fail(_join(key, name), "expected an object of strings")
        return None if value is None else dict(value)

    def positive(self, obj: Mapping, key: str, name: str, kind: type | tuple[type, ...]) -> Any:
        value = self.get(obj, key, name, kind)
        if value is not None and value <= 0:
            raise self.fail(_join(key, name), f"must be > 0, got {value}")
        return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _kinds(kind)))


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _source(r: _Reader, value: Any, key: str) -> Source:
    if not isinstance(value, Mapping):
        raise r.fail(key, f"expected an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind not in SOURCE_TYPES:
        raise r.fail(_join(key, "type"), f"unknown source type {json.dumps(kind)} "
                                         f"(expected {', '.join(SOURCE_TYPES)})")
    if kind == "Process":
        obj = r.object(value, key, ("type", "command", "args", "env", "work_dir"), ("command",))
        command = r.get(obj, key, "command", str, nullable=False)
        if not command.strip():
            raise r.fail(_join(key, "command"), "must not be empty")
        return McpServerSource.Process(command=command, args=r.strings(obj, key, "args") or [],
                                       env=r.string_map(obj, key, "env"), work_dir=r.get(obj, key, "work_dir", str))
    obj = r.object(value, key, ("type", "url", "timeout_secs", "headers"), ("url",))
    url = r.get(obj, key, "url", str, nullable=False)
    schemes = ("http://", "https://") if kind == "Http" else ("ws://", "wss://")
    if not url.startswith(schemes):
        raise r.fail(_join(key, "url"), f"a {kind} source needs a {' or '.join(s[:-3] for s in schemes)} URL, "
                                        f"got {url!r}")
    cls = SOURCE_TYPES[kind]
    return cls(url=url, timeout_secs=r.positive(obj, key, "timeout_secs", (int, float)),
               headers=r.string_map(obj, key, "headers"))


def mcp_config_from_dict(data: Any, where: str = "mcp config") -> McpClientConfig:
    """Validate mistral.rs's MCP client JSON (a parsed dict) into an `McpClientConfig`."""
    r = _Reader(where)
    top = r.object(data, "", ("servers", "auto_register_tools", "tool_timeout_secs", "max_concurrent_calls"),
                   ("servers", "auto_register_tools"))
    servers_raw = r.get(top, "", "servers", list, nullable=False)
    servers = []
    for i, raw in enumerate(servers_raw):
        key = f"servers[{i}]"
        obj = r.object(raw, key, ("id", "name", "source", "enabled", "tool_prefix", "resources", "bearer_token"),
                       ("id", "name", "source"))
        servers.append(McpServerConfig(
            id=r.get(obj, key, "id", str, nullable=False),
            name=r.get(obj, key, "name", str, nullable=False),
            source=_source(r, obj["source"], f"{key}.source"),
            enabled=r.get(obj, key, "enabled", bool, default=True, nullable=False),
            tool_prefix=r.get(obj, key, "tool_prefix", str),
            resources=r.strings(obj, key, "resources"),
            bearer_token=r.get(obj, key, "bearer_token", str),
        ))
    config = McpClientConfig(
        servers=servers,
        auto_register_tools=r.get(top, "", "auto_register_tools", bool, nullable=False),
        tool_timeout_secs=r.positive(top, "", "tool_timeout_secs", (int, float)),
        max_concurrent_calls=r.positive(top, "", "max_concurrent_calls", int),
        path=where,
    )
    validate_mcp_config(config)
    return config


def validate_mcp_config(config: McpClientConfig) -> McpClientConfig:
    """Checks that span servers (unique ids and prefixes, usable prefixes); also for configs built in Python."""
    r = _Reader(config.path)
    if not isinstance(config, McpClientConfig):
        raise ConfigError(f"mcp_client_config must be an McpClientConfig, got {type(config).__name__}")
    ids: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    for i, server in enumerate(config.servers):
        key = f"servers[{i}]"
        if not isinstance(server, McpServerConfig):
            raise r.fail(key, f"expected an McpServerConfig, got {type(server).__name__}")
        if not isinstance(server.source, tuple(SOURCE_TYPES.values())):
            raise r.fail(f"{key}.source", f"expected McpServerSource.Process, .Http or .WebSocket, "
                                          f"got {type(server.source).__name__}")
        if server.id in ids:
            raise r.fail(f"{key}.id", f"{server.id!r} is already the id of servers[{ids[server.id]}]")
        ids[server.id] = i
        if server.tool_prefix is not None:
            if not _PREFIX.match(server.tool_prefix):
                raise r.fail(f"{key}.tool_prefix", f"{server.tool_prefix!r} must be 1-48 letters, digits, _ or -")
            if server.tool_prefix in prefixes:
                raise r.fail(f"{key}.tool_prefix", f"duplicate prefix {server.tool_prefix!r}, already used by "
                                                   f"servers[{prefixes[server.tool_prefix]}]")
            prefixes[server.tool_prefix] = i
    return config


def load_mcp_config(path: str | Path) -> McpClientConfig:
    """Read an MCP client config file (JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"MCP config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read MCP config file {p}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return mcp_config_from_dict(data, str(p))


def as_mcp_config(value: Any) -> McpClientConfig | None:
    """An `McpClientConfig` from a config object, a path to a JSON file, a dict, or None."""
    if value is None or isinstance(value, McpClientConfig):
        return value if value is None else validate_mcp_config(value)
    if isinstance(value, (str, Path)):
        return load_mcp_config(value)
    if isinstance(value, Mapping):
        return mcp_config_from_dict(value)
    raise ConfigError(f"mcp_client_config must be an McpClientConfig, a dict or a path to a JSON file, "
                      f"got {type(value).__name__}")
