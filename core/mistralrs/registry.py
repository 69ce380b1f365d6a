"""Typed catalogues built from the plugins' hooks; lookup by name and selection by priority.

Selection logic lives here, never in plugins: `Catalogue.select(**context)` keeps the
entries whose ``supports(**context)`` is true and returns the highest ``priority`` one
(ties broken by name, so the choice is deterministic).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import attrs

from mistralrs import specs as S
from mistralrs.errors import NoCandidateError, NotFoundError, PluginConflictError
from mistralrs.hookspecs import CATALOGUE_HOOKS
from mistralrs.plugin_records import PluginFailure, PluginInfo, PluginLoadWarning


class HookHost(Protocol):
    """What `Registry.build` needs of the plugin host (`mistralrs.plugins.PluginHost`)."""

    pm: Any  # the pluggy PluginManager
    plugins: dict[str, PluginInfo]
    failures: list[PluginFailure]
    tracing: bool


@attrs.define
class Entry:
    spec: S.Spec
    plugin: str
    distribution: str | None

    @property
    def origin(self) -> str:
        return f"plugin {self.plugin!r} ({self.distribution or 'not from a distribution'})"


def _key(spec: S.Spec) -> str:
    # Kernels are named per op: "rms_norm/torch" and "rotary/torch" do not collide.
    return f"{spec.op}/{spec.name}" if isinstance(spec, S.KernelSpec) else spec.name


class Catalogue:
    """All registered specs of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        key = _key(entry.spec)
        existing = self.entries.get(key)
        if existing is None:
            self.entries[key] = entry
            return
        if entry.spec.overrides and not existing.spec.overrides:
            self.entries[key] = entry
        elif existing.spec.overrides and not entry.spec.overrides:
            pass
        else:
            raise PluginConflictError(
                f"{self.kind} {key!r} is registered by {existing.origin} and by {entry.origin}; "
                "uninstall one of them, or set overrides=True on the one that should win"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[S.Spec]:
        return (e.spec for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Any:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFoundError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}"
            )
        return entry.spec

    def entry(self, name: str) -> Entry:
        self.get(name)
        return self.entries[name]

    def candidates(self, **context: Any) -> list[Any]:
        """Supporting specs for a context, best first."""
        found = [e.spec for e in self.entries.values() if e.spec.is_supported(**context)]
        return sorted(found, key=lambda s: (-s.priority, s.name))

    def select(self, **context: Any) -> Any:
        """The highest-priority spec that supports the context."""
        found = self.candidates(**context)
        if not found:
            ctx = ", ".join(f"{k}={v}" for k, v in context.items())
            raise NoCandidateError(
                f"no {self.kind} supports {ctx or 'this request'}; registered: {', '.join(self.names()) or 'none'}"
            )
        return found[0]


class CommandCollector:
    """What `register_commands(cli)` receives."""

    def __init__(self, register: Any) -> None:
        self._register = register

    def add_command(self, spec: S.CommandSpec) -> None:
        self._register(spec)


class Registry:
    """One catalogue per plugin kind, plus what each plugin registered."""

    def __init__(self) -> None:
        self.catalogues: dict[str, Catalogue] = {kind: Catalogue(kind) for kind in S.SPEC_KINDS}
        self.registered_by: dict[str, dict[str, list[str]]] = {}

    def __getitem__(self, kind: str) -> Catalogue:
        return self.catalogues[kind]

    # Convenience accessors.
    architectures = property(lambda self: self.catalogues["architecture"])
    quantizers = property(lambda self: self.catalogues["quantizer"])
    attention_backends = property(lambda self: self.catalogues["attention_backend"])
    devices = property(lambda self: self.catalogues["device"])
    kernels = property(lambda self: self.catalogues["kernel"])
    tool_sources = property(lambda self: self.catalogues["tool_source"])
    search_backends = property(lambda self: self.catalogues["search_backend"])
    frontends = property(lambda self: self.catalogues["frontend"])
    commands = property(lambda self: self.catalogues["command"])
    tool_parsers = property(lambda self: self.catalogues["tool_parser"])
    reasoning_parsers = property(lambda self: self.catalogues["reasoning_parser"])

    @classmethod
    def build(cls, host: HookHost) -> Registry:
        """Call every catalogue hook of every plugin, one plugin at a time, so a plugin that
        raises is skipped (with a warning) without losing the others' registrations."""
        registry = cls()
        for hook_name, kind in CATALOGUE_HOOKS.items():
            spec_type = S.SPEC_KINDS[kind]
            caller = getattr(host.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                info = host.plugins.get(impl.plugin_name)
                dist = info.distribution if info else None
                pending: list[S.Spec] = []

                def register(spec: Any, _pending: list = pending, _t: type = spec_type, _h: str = hook_name) -> None:
                    if not isinstance(spec, _t):
                        raise TypeError(f"{_h} expects {_t.__name__} objects, got {type(spec).__name__}")
                    _pending.append(spec)

                arg = CommandCollector(register) if kind == "command" else register
                kwargs = {"cli" if kind == "command" else "register": arg}
                try:
                    impl.function(*[kwargs[name] for name in impl.argnames])
                except Exception as exc:  # noqa: BLE001 - the plugin's failure, not the host's
                    failure = PluginFailure(
                        impl.plugin_name, dist, info.version if info else None, "register",
                        f"{hook_name} raised {type(exc).__name__}: {exc}",
                    )
                    host.failures.append(failure)
                    warnings.warn(failure.message(), stacklevel=2, category=PluginLoadWarning)
                    continue
                for spec in pending:
                    registry.catalogues[kind].add(Entry(spec, impl.plugin_name, dist))
                    registry.registered_by.setdefault(impl.plugin_name, {}).setdefault(kind, []).append(_key(spec))
                if host.tracing:
                    names = ", ".join(_key(s) for s in pending) or "nothing"
                    sys.stderr.write(f"mistralrs trace: {hook_name} -> {impl.plugin_name}: {names}\n")
        return registry

    # -- lookups that need more than a name ------------------------------------------
    def architecture_for(
        self,
        *,
        hf_architecture: str | None = None,
        model_type: str | None = None,
        gguf_architecture: str | None = None,
        kind: str | None = None,
    ) -> S.ArchitectureSpec:
        """The architecture serving an HF `architectures[0]`, else `model_type`, else a GGUF name.
        `kind` (``embedding``): only architectures of that kind; None: any, generative ones first
        (Qwen3ForCausalLM is Qwen3, unless the model is served as an embedding model)."""
        queries = (
            ("hf_architectures", hf_architecture),
            ("model_types", model_type),
            ("gguf_architectures", gguf_architecture),
        )
        for field, value in queries:
            if not value:
                continue
            found = [s for s in self.architectures if value in getattr(s, field)
                     and (kind is None or s.kind_of_model == kind)]
            if found:
                found.sort(key=lambda s: (s.kind_of_model == "embedding", -s.priority, s.name))
                return found[0]
        asked = ", ".join(f"{v!r}" for _, v in queries if v) or "nothing"
        if kind is not None:
            asked = f"{asked} as a model of kind {kind!r}"
        raise NotFoundError(
            f"no architecture plugin serves {asked}; supported: {', '.join(self.supported_architecture_names())}"
            " (choose one with -a/--arch, or install a plugin that adds it)"
        )

    def quantizer_for_ggml_type(self, ggml_type: int) -> S.QuantizerSpec | None:
        """The quantizer that stores GGML tensors of type id `ggml_type` as they are (None: none does)."""
        found = [s for s in self.quantizers if s.ggml_type == ggml_type]
        found.sort(key=lambda s: (-s.priority, s.name))
        return found[0] if found else None

    def quantizers_for_uqff_format(self, tag: int) -> list[S.QuantizerSpec]:
        """The quantizers whose layers UQFF records of family `tag` hold (``weight.format``)."""
        found = [s for s in self.quantizers if s.uqff_format == tag]
        found.sort(key=lambda s: (-s.priority, s.name))
        return found

    def quantizer_for_checkpoint(self, quant_method: str) -> S.QuantizerSpec | None:
        """The quantizer that loads HF checkpoints whose ``quant_method`` is `quant_method`."""
        key = quant_method.strip().lower()
        found = [s for s in self.quantizers if key in (f.lower() for f in s.checkpoint_formats)]
        found.sort(key=lambda s: (-s.priority, s.name))
        return found[0] if found else None

    def checkpoint_formats(self) -> list[str]:
        return sorted({f.lower() for s in self.quantizers for f in s.checkpoint_formats})

    def supported_architecture_names(self) -> list[str]:
        names: set[str] = set()
        for spec in self.architectures:
            names.add(spec.name)
            names.update(spec.hf_architectures)
        return sorted(names)

    def kernel(self, op: str, device: str, **context: Any) -> S.KernelSpec:
        """The best implementation of `op` for a device type."""
        found = [
            s for s in self.kernels
            if s.op == op and device in s.devices and s.is_supported(device=device, **context)
        ]
        if not found:
            raise NoCandidateError(f"no kernel implements {op!r} on {device!r}")
        return sorted(found, key=lambda s: (-s.priority, s.name))[0]

    def reference_kernel(self, op: str) -> S.KernelSpec:
        for spec in self.kernels:
            if spec.op == op and spec.reference:
                return spec
        raise NotFoundError(f"no reference kernel registered for op {op!r}")
