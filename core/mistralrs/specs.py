"""What plugins register: small frozen attrs classes, one per plugin kind.

Every spec has a `name` (unique within its kind), a `priority` (higher wins when the core
selects among candidates), an optional `supports` predicate, and `overrides`: set it to
True to replace a same-named entry from another plugin on purpose (otherwise two entries
with one name are an error that names both distributions).

Heavy objects are referenced lazily as ``"package.module:attr"`` strings (or given
directly as objects); `resolve()` imports them on first use, so registering costs nothing
and `mistralrs --help` never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

import attrs

# A lazy reference: either the object itself or "module:attr" (attr may be dotted).
Ref = Any


def resolve(ref: Ref) -> Any:
    """Return the object a lazy reference names (objects are returned unchanged)."""
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"lazy reference {ref!r} must look like 'package.module:attribute'")
    obj: Any = import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen(kw_only=True)
class Spec:
    """Fields common to every kind of registration."""

    name: str
    priority: int = 0
    overrides: bool = False
    description: str = ""
    # Predicate over a selection context (keyword arguments such as device="cpu",
    # dtype="bfloat16"); None means "supports everything". Must be cheap.
    supports: Callable[..., bool] | None = attrs.field(default=None, eq=False)

    kind: str = attrs.field(init=False, default="")

    def is_supported(self, **context: Any) -> bool:
        if self.supports is None:
            return True
        import inspect

        params = inspect.signature(self.supports).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return bool(self.supports(**context))
        return bool(self.supports(**{k: v for k, v in context.items() if k in params}))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (used by `mistralrs plugins --json`)."""
        out: dict[str, Any] = {"name": self.name}
        for field in attrs.fields(type(self)):
            if field.name in ("name", "kind", "supports", "overrides"):
                continue
            value = getattr(self, field.name)
            if callable(value) and not isinstance(value, type):
                value = getattr(value, "__qualname__", repr(value))
            elif isinstance(value, type):
                value = f"{value.__module__}:{value.__qualname__}"
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


@attrs.frozen(kw_only=True)
class ArchitectureSpec(Spec):
    """A model architecture. `builder` is "module:Class"; the class is constructed from the
    HF config and a load context and implements the model-forward contract (docs/hooks.md)."""

    builder: Ref
    kind_of_model: str = "text"  # text | vision | embedding | speech | diffusion
    hf_architectures: tuple[str, ...] = attrs.field(default=(), converter=_names)
    model_types: tuple[str, ...] = attrs.field(default=(), converter=_names)
    gguf_architectures: tuple[str, ...] = attrs.field(default=(), converter=_names)
    # "module:function": (GgufModel) -> mistralrs.gguf.convert.GgufConversion, the HF config and
    # checkpoint names of a GGUF file of one of `gguf_architectures` (docs/gguf.md).
    gguf_converter: Ref | None = None
    # Vision models (kind_of_model="vision"): "module:Class" of the input processor, built as
    # ``Class(model_dir, config, tokenizer)``; ``process(prompt, images)`` turns a rendered prompt
    # and its images into token ids and `multimodal.inputs.MmItem`s (docs/vision.md).
    processor: Ref | None = None
    kind: str = attrs.field(init=False, default="architecture")


@attrs.frozen(kw_only=True)
class QuantizerSpec(Spec):
    """A quantization method. `method` is "module:Class" of a linear method with the life cycle
    create_weights -> (loader fills) -> process_after_loading -> apply; it is constructed as
    ``method(qtype=<name>)``.

    The ISQ fields are data the core selects by, so the core never names a format:
    `isq` marks a type that can quantize float weights at load (``--isq``); `bits_per_weight`
    sizes it (tune, doctor); `shorthand` is the ``--isq N`` number it answers to on
    `shorthand_devices`; `sensitive` is the type token embeddings and the LM head are promoted
    to; `fallback` is the type a layer whose shape this one cannot take gets instead (None:
    left unquantized); `devices` are the torch device types it runs on."""

    method: Ref
    aliases: tuple[str, ...] = attrs.field(default=(), converter=_names)
    isq: bool = False
    bits_per_weight: float | None = None
    shorthand: int | None = None
    shorthand_devices: tuple[str, ...] = attrs.field(default=(), converter=_names)
    sensitive: str | None = None
    fallback: str | None = None
    devices: tuple[str, ...] = attrs.field(default=("cpu",), converter=_names)
    # The GGML tensor type id (GGUF ``ggml_type``) whose block bytes this format stores as they
    # are: GGUF tensors of that type load into it without re-quantizing (`ggml_state`).
    ggml_type: int | None = None
    # The UQFF record family (``<key>.weight.format`` tag, docs/uqff.md) this format's layers are
    # written as and read from; the method class implements the record (``uqff_entries`` ...).
    uqff_format: int | None = None
    # The ``quantization_config.quant_method`` values of HF checkpoints this format loads as
    # published (docs/prequantized.md); the method is then a `nn.quantized.CheckpointLinearMethod`.
    checkpoint_formats: tuple[str, ...] = attrs.field(default=(), converter=_names)
    kind: str = attrs.field(init=False, default="quantizer")


@attrs.frozen(kw_only=True)
class AttentionBackendSpec(Spec):
    """An attention backend: builds KV-cache storage and attends. `supports(device, dtype,
    head_dim, ...)` decides whether it can run; the highest-priority supporter is chosen."""

    backend: Ref
    paged: bool = False
    kind: str = attrs.field(init=False, default="attention_backend")


@attrs.frozen(kw_only=True)
class DeviceSpec(Spec):
    """A device backend. `available()` probes the hardware (import torch inside it);
    `device_type` is the torch device type ("cpu", "cuda", "mps", ...)."""

    device_type: str
    available: Callable[[], bool] = attrs.field(eq=False)
    info: Callable[[], dict[str, Any]] | None = attrs.field(default=None, eq=False)
    kind: str = attrs.field(init=False, default="device")


@attrs.frozen(kw_only=True)
class KernelSpec(Spec):
    """One implementation of a named op (`rms_norm`, `rotary`, `silu_and_mul`, ...).
    Names are unique per op. `devices` lists torch device types it runs on."""

    op: str
    impl: Ref
    devices: tuple[str, ...] = attrs.field(default=("cpu",), converter=_names)
    reference: bool = False  # the torch reference that tests compare against
    # (device, **context) -> why this kernel does not claim `device`, or None: what `mistralrs doctor` and
    # `mistralrs plugins` print for a kernel that is not selected (no triton, no GPU, ...). Optional.
    why_unsupported: Callable[..., str | None] | None = attrs.field(default=None, eq=False)
    kind: str = attrs.field(init=False, default="kernel")


@attrs.frozen(kw_only=True)
class ToolSourceSpec(Spec):
    """A source of tools the engine can call server-side. `factory()` returns an object with
    `list_tools() -> list[dict]` (OpenAI function schemas) and `call(name, arguments) -> str`."""

    factory: Ref
    kind: str = attrs.field(init=False, default="tool_source")


@attrs.frozen(kw_only=True)
class SearchBackendSpec(Spec):
    """A web-search backend. `factory()` returns an object with ``search(query, max_results)``
    (a list of `mistralrs.web_search.results.SearchResult`) and ``extract(url) -> str``; the
    highest-priority one is the default, ``--search-backend NAME`` picks another."""

    factory: Ref
    kind: str = attrs.field(init=False, default="search_backend")


@attrs.frozen(kw_only=True)
class FrontendSpec(Spec):
    """An API frontend (HTTP server, MCP server, interactive mode, ...). `factory` is called
    with the engine handle(s) and options and returns something with a `run()`/`serve()`.

    A frontend that adds routes to the HTTP server (`serve`) instead, or as well, names a
    `mount(app)` that adds them to its aiohttp application; the server mounts every such
    frontend with `mount_by_default`, and the others when asked (`serve --ui`: `webui`)."""

    factory: Ref | None = None
    mount: Ref | None = None
    mount_by_default: bool = True
    kind: str = attrs.field(init=False, default="frontend")


@attrs.frozen(kw_only=True)
class ToolCallParserSpec(Spec):
    """Parses a model family's tool-call syntax out of generated text."""

    parser: Ref
    model_types: tuple[str, ...] = attrs.field(default=(), converter=_names)
    kind: str = attrs.field(init=False, default="tool_parser")


@attrs.frozen(kw_only=True)
class ReasoningParserSpec(Spec):
    """Splits reasoning (`<think>...</think>` and the like) from answer text."""

    parser: Ref
    model_types: tuple[str, ...] = attrs.field(default=(), converter=_names)
    kind: str = attrs.field(init=False, default="reasoning_parser")


@attrs.frozen(kw_only=True)
class CommandSpec(Spec):
    """A `mistralrs` subcommand. `add_arguments(parser)` fills an argparse parser;
    `run(args) -> int` executes it and returns the exit status. Both may be lazy refs."""

    run: Ref
    add_arguments: Ref | None = None
    help: str = ""
    kind: str = attrs.field(init=False, default="command")


SPEC_KINDS: dict[str, type[Spec]] = {
    "architecture": ArchitectureSpec,
    "quantizer": QuantizerSpec,
    "attention_backend": AttentionBackendSpec,
    "device": DeviceSpec,
    "kernel": KernelSpec,
    "tool_source": ToolSourceSpec,
    "search_backend": SearchBackendSpec,
    "frontend": FrontendSpec,
    "tool_parser": ToolCallParserSpec,
    "reasoning_parser": ReasoningParserSpec,
    "command": CommandSpec,
}
