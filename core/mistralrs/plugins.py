"""The plugin manager: finds plugins through the ``mistralrs`` entry-point group, once, lazily.

Environment switches (documented in docs/plugins.md):

- ``MISTRALRS_PLUGINS=a,b``: allow-list of third-party plugins, by entry-point name or
  distribution name. When set, only these third-party plugins load.
- ``MISTRALRS_DISABLE_PLUGIN_AUTOLOAD=1``: do not autoload third-party plugins; only those
  named in ``MISTRALRS_PLUGINS`` load. First-party plugins (the ``mistralrs`` distribution's
  own entry points) always load: they are the product.
- ``MISTRALRS_BLOCK_PLUGINS=a,b``: never load these entry points, first-party included.
- ``MISTRALRS_TRACE_PLUGINS=1``: print every plugin load and hook call to stderr.

A plugin that fails to import, fails validation, or raises while registering becomes a
`PluginLoadWarning` naming the plugin, its distribution and the error; the host goes on.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import pluggy

from mistralrs import hookspecs
from mistralrs.plugin_records import PluginFailure, PluginInfo, PluginLoadWarning
from mistralrs.registry import Registry

__all__ = [
    "ENTRY_POINT_GROUP", "FIRST_PARTY_DISTRIBUTION", "INTERNAL_PLUGINS", "PluginFailure", "PluginHost",
    "PluginInfo", "PluginLoadWarning", "get_plugin_host", "get_registry", "reset_plugin_host",
]

ENTRY_POINT_GROUP = "mistralrs"
FIRST_PARTY_DISTRIBUTION = "mistralrs"
# Core modules that are always registered (not entry points): the CLI's own commands.
INTERNAL_PLUGINS: tuple[str, ...] = ("mistralrs.cli.builtin",)


def _env_list(environ: Mapping[str, str], key: str) -> set[str] | None:
    raw = environ.get(key)
    if raw is None:
        return None
    return {_normalize(item) for item in raw.split(",") if item.strip()}


def _env_flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _dist_name(dist: Any) -> str | None:
    try:
        return dist.metadata["Name"]
    except Exception:  # noqa: BLE001 - broken metadata must not crash discovery
        return None


class PluginHost:
    """Owns the pluggy manager, the loaded plugins and the registry built from them."""

    def __init__(
        self,
        *,
        distributions: Callable[[], Iterable[Any]] | None = None,
        environ: Mapping[str, str] | None = None,
        internal: Iterable[str] = INTERNAL_PLUGINS,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._distributions = distributions or importlib_metadata.distributions
        self._environ = os.environ if environ is None else environ
        self._internal = tuple(internal)
        self._lock = threading.RLock()
        self._loaded = False
        self._registry: Any = None
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.tracing = _env_flag(self._environ, "MISTRALRS_TRACE_PLUGINS")
        if self.tracing:
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"mistralrs trace: {msg}"))
            self.pm.enable_tracing()

    # -- loading -----------------------------------------------------------------------
    def load(self) -> PluginHost:
        """Load internal plugins and entry points, once. Safe to call from any thread."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            for module_name in self._internal:
                from importlib import import_module

                self.register(import_module(module_name), name=module_name, first_party=True)
            self._load_entry_points()
            return self

    def _load_entry_points(self) -> None:
        allow = _env_list(self._environ, "MISTRALRS_PLUGINS")
        block = _env_list(self._environ, "MISTRALRS_BLOCK_PLUGINS") or set()
        autoload = not _env_flag(self._environ, "MISTRALRS_DISABLE_PLUGIN_AUTOLOAD")
        found_first_party = False
        seen: set[str] = set()
        for dist in self._distributions():
            eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
            if not eps:
                continue  # (before the name: parsing every distribution's metadata took ~75 ms)
            dist_name = _dist_name(dist)
            if dist_name is None or _normalize(dist_name) in seen:
                continue  # the same distribution on sys.path twice
            seen.add(_normalize(dist_name))
            first_party = _normalize(dist_name) == FIRST_PARTY_DISTRIBUTION
            found_first_party |= first_party
            version = getattr(dist, "version", None)
            for ep in eps:
                if _normalize(ep.name) in block:
                    self._trace(f"blocked plugin {ep.name} ({dist_name})\n")
                    continue
                if not first_party:
                    wanted = {_normalize(ep.name), _normalize(dist_name)}
                    if allow is not None and not (wanted & allow):
                        continue
                    if allow is None and not autoload:
                        continue
                if ep.name in self.plugins:
                    other = self.plugins[ep.name]
                    self._fail(
                        PluginFailure(
                            ep.name, dist_name, version, "import",
                            f"entry-point name {ep.name!r} is already used by {other.distribution}; "
                            "rename one of the two entry points",
                        )
                    )
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # noqa: BLE001 - any failure is the plugin's, not ours
                    self._fail(PluginFailure(ep.name, dist_name, version, "import", f"{type(exc).__name__}: {exc}"))
                    continue
                self.register(plugin, name=ep.name, module=ep.value, distribution=dist_name,
                              version=version, first_party=first_party)
        if not found_first_party:
            warnings.warn(
                "the mistralrs distribution is not installed, so its built-in plugins are missing; "
                "run `pip install -e .` in the source checkout",
                PluginLoadWarning,
                stacklevel=3,
            )

    def register(
        self,
        plugin: Any,
        *,
        name: str,
        module: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
        first_party: bool = False,
    ) -> bool:
        """Register a plugin object or module by hand (tests, embedding applications).

        Returns False (with a warning) if the plugin is invalid."""
        with self._lock:
            try:
                self.pm.register(plugin, name=name)
            except Exception as exc:  # noqa: BLE001 - pluggy validation errors and the like
                self._fail(PluginFailure(name, distribution, version, "validate", f"{type(exc).__name__}: {exc}"))
                return False
            unknown = [
                impl.function.__name__
                for caller in (self.pm.get_hookcallers(plugin) or [])
                if not caller.has_spec()
                for impl in caller.get_hookimpls()
                if impl.plugin is plugin
            ]
            if unknown:
                self.pm.unregister(plugin)
                self._fail(PluginFailure(
                    name, distribution, version, "validate",
                    f"implements unknown hook(s) {', '.join(sorted(unknown))}; see docs/hooks.md for the hook names",
                ))
                return False
            self.plugins[name] = PluginInfo(
                name=name,
                module=module or cast(str, getattr(plugin, "__name__", type(plugin).__qualname__)),
                distribution=distribution,
                version=version,
                first_party=first_party,
                plugin=plugin,
            )
            self._registry = None
            self._trace(f"loaded plugin {name} ({distribution or 'internal'})\n")
            return True

    def unregister(self, name: str) -> None:
        with self._lock:
            self.pm.unregister(name=name)
            self.plugins.pop(name, None)
            self._registry = None

    def _fail(self, failure: PluginFailure) -> None:
        self.failures.append(failure)
        warnings.warn(failure.message(), PluginLoadWarning, stacklevel=4)

    def _trace(self, message: str) -> None:
        if self.tracing:
            sys.stderr.write(f"mistralrs trace: {message}")

    # -- queries -----------------------------------------------------------------------
    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            return []
        return sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or []))

    def registry(self) -> Any:
        """The registry built from every loaded plugin's hooks (built once, then cached)."""
        with self._lock:
            self.load()
            if self._registry is None:
                self._registry = Registry.build(self)
            return self._registry


_host: PluginHost | None = None
_host_lock = threading.Lock()


def get_plugin_host() -> PluginHost:
    """The process-wide plugin host, loaded on first call."""
    global _host
    with _host_lock:
        if _host is None:
            _host = PluginHost()
    return _host.load()


def get_registry() -> Any:
    """The process-wide `mistralrs.registry.Registry`."""
    return get_plugin_host().registry()


def reset_plugin_host(host: PluginHost | None = None) -> None:
    """Replace the process-wide host (tests and embedding applications)."""
    global _host
    with _host_lock:
        _host = host
