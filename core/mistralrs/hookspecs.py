"""Every hook a mistralrs plugin can implement: the only contract between core and plugins.

A plugin is a module (or object) with functions decorated by ``@mistralrs.hookimpl`` and
named after the hooks below. It is found through the ``mistralrs`` entry-point group::

    [project.entry-points.mistralrs]
    my_plugin = "my_package.my_plugin"

All catalogue hooks use the *register-callback* style: the core calls the hook once per
plugin with a ``register`` function, and the plugin calls ``register(spec)`` for each thing
it provides (see `mistralrs.specs`). A plugin never touches global state. An implementation
may accept a subset of a hook's arguments, so hooks can grow new arguments without breaking
old plugins. Hooks are called when the registry is first needed (lazily, once per process),
in no guaranteed plugin order: precedence is expressed through ``priority`` and
``overrides`` on the specs, never through load order.

Registering must be cheap: no torch import, no hardware probing, no file I/O. Put heavy
work behind lazy ``"module:attr"`` references; the core imports them on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "mistralrs"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[Any], None]


@hookspec
def register_architectures(register: Register) -> None:
    """Register model architectures.

    Called: when the architecture catalogue is first built (loading a model, listing plugins).
    Receives: ``register``, to be called with one `mistralrs.specs.ArchitectureSpec` per
    architecture. The spec names the HF ``architectures`` / ``model_type`` values and GGUF
    ``general.architecture`` names it serves; ``builder`` is the model class ("module:Class").
    Returns: nothing.
    """


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantization methods (ISQ types, GGUF, GPTQ, AWQ, ...).

    Called: when the quantizer catalogue is first built.
    Receives: ``register``, to be called with `mistralrs.specs.QuantizerSpec` objects whose
    ``method`` implements create_weights / process_after_loading / apply.
    Returns: nothing.
    """


@hookspec
def register_attention_backends(register: Register) -> None:
    """Register attention backends (reference SDPA, paged CPU, Triton paged, ...).

    Called: when an engine or model needs attention and selects a backend.
    Receives: ``register``, to be called with `mistralrs.specs.AttentionBackendSpec`
    objects. ``supports(device=..., dtype=..., head_dim=..., paged=...)`` says whether a
    backend can serve that context; the core picks the highest ``priority`` supporter.
    Returns: nothing.
    """


@hookspec
def register_devices(register: Register) -> None:
    """Register device backends (cpu, cuda, mps, ...).

    Called: when the core resolves which devices exist (``--cpu``, device maps, doctor).
    Receives: ``register``, to be called with `mistralrs.specs.DeviceSpec` objects whose
    ``available()`` probes the hardware lazily.
    Returns: nothing.
    """


@hookspec
def register_kernels(register: Register) -> None:
    """Register implementations of named ops (``rms_norm``, ``rotary``, ``silu_and_mul``, ...).

    Called: when a model first looks up a kernel.
    Receives: ``register``, to be called with `mistralrs.specs.KernelSpec` objects. Names
    are unique per op; for a device the highest-priority supporting implementation is used,
    and the one marked ``reference=True`` is what tests compare the others against.
    Returns: nothing.
    """


@hookspec
def register_tool_sources(register: Register) -> None:
    """Register sources of server-side tools (MCP clients, web search, Python callables).

    Called: when the engine or ``mistralrs tools`` lists the tools it can call.
    Receives: ``register``, to be called with `mistralrs.specs.ToolSourceSpec` objects whose
    ``factory()`` returns an object with ``list_tools()`` and ``call(name, arguments)``.
    Returns: nothing.
    """


@hookspec
def register_search_backends(register: Register) -> None:
    """Register web-search backends (``--enable-search``; docs/web-search.md).

    Called: when a server or Runner with search enabled starts.
    Receives: ``register``, to be called with `mistralrs.specs.SearchBackendSpec` objects whose
    ``factory()`` returns an object with ``search(query, max_results) -> list[SearchResult]``
    (title, description, url and the page's text) and ``extract(url) -> str``.
    Returns: nothing.
    """


@hookspec
def register_frontends(register: Register) -> None:
    """Register API frontends (OpenAI HTTP server, MCP server, interactive mode, web UI).

    Called: when a command needs a frontend by name (``serve``, ``run``).
    Receives: ``register``, to be called with `mistralrs.specs.FrontendSpec` objects.
    Returns: nothing.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add subcommands to the ``mistralrs`` command line.

    Called: when the CLI builds its parser (every ``mistralrs`` invocation).
    Receives: ``cli``, a `mistralrs.registry.CommandCollector`; call
    ``cli.add_command(CommandSpec(name=..., help=..., add_arguments=..., run=...))``.
    ``add_arguments(parser)`` fills an argparse parser and ``run(args)`` returns the exit
    status; give them as lazy "module:function" references so ``--help`` stays fast.
    Returns: nothing.
    """


@hookspec
def register_tool_parsers(register: Register) -> None:
    """Register tool-call parsers (Hermes ``<tool_call>``, Llama 3 JSON, Mistral ``[TOOL_CALLS]``...).

    Called: when a model's output needs tool calls extracted.
    Receives: ``register``, to be called with `mistralrs.specs.ToolCallParserSpec` objects;
    ``model_types`` lists the model families a parser is the default for.
    Returns: nothing.
    """


@hookspec
def register_reasoning_parsers(register: Register) -> None:
    """Register reasoning parsers that split ``<think>...</think>``-style reasoning from answers.

    Called: when a model's output needs reasoning content separated.
    Receives: ``register``, to be called with `mistralrs.specs.ReasoningParserSpec` objects.
    Returns: nothing.
    """


# Hook name -> the keyword its register callback is passed as.
CATALOGUE_HOOKS: dict[str, str] = {
    "register_architectures": "architecture",
    "register_quantizers": "quantizer",
    "register_attention_backends": "attention_backend",
    "register_devices": "device",
    "register_kernels": "kernel",
    "register_tool_sources": "tool_source",
    "register_search_backends": "search_backend",
    "register_frontends": "frontend",
    "register_commands": "command",
    "register_tool_parsers": "tool_parser",
    "register_reasoning_parsers": "reasoning_parser",
}
