"""mistralrs: a plugin-based LLM inference engine for Python.

Importing this package is cheap: nothing here imports torch. The Python API
(`Runner`, `Which`, requests) and other heavy parts are loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from mistralrs.hookspecs import hookimpl  # noqa: E402  (cheap: pluggy only)

# Lazily exported names: module that defines them.
_LAZY: dict[str, str] = {
    "get_registry": "mistralrs.plugins",
    "get_plugin_host": "mistralrs.plugins",
    "Runner": "mistralrs.api",
    "Which": "mistralrs.api",
    "ChatCompletionRequest": "mistralrs.api",
    "CompletionRequest": "mistralrs.api",
    "EmbeddingRequest": "mistralrs.api",
    "EmbeddingArchitecture": "mistralrs.api",
    "ModelDType": "mistralrs.api",
    "Architecture": "mistralrs.api",
    "PagedCacheType": "mistralrs.api",
    "ToolChoice": "mistralrs.api",
    "McpClientConfig": "mistralrs.mcp_config",
    "McpServerConfig": "mistralrs.mcp_config",
    "McpServerSource": "mistralrs.mcp_config",
    "McpClientConfigPy": "mistralrs.api",
    "McpServerConfigPy": "mistralrs.api",
    "McpServerSourcePy": "mistralrs.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mistralrs' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = ["__version__", "hookimpl", *_LAZY]
