"""Fake distributions and entry points for plugin-discovery tests (the pytest approach:
hand PluginHost a `distributions()` that returns these instead of the installed ones)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import attrs

from mistralrs.plugins import PluginHost


@attrs.define
class FakeEntryPoint:
    name: str
    value: str
    loader: Callable[[], Any]
    group: str = "mistralrs"

    def load(self) -> Any:
        return self.loader()


@attrs.define
class FakeDistribution:
    name: str
    version: str
    entry_points: list[FakeEntryPoint]

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


def plugin_module(name: str, **hooks: Callable) -> types.ModuleType:
    """A module object holding the given hook implementations."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, fn)
    return module


def dist(name: str, version: str = "1.0", **plugins: Any) -> FakeDistribution:
    """A distribution whose entry points load the given plugin objects (or raise, if given
    an exception instance)."""

    def loader(obj: Any) -> Callable[[], Any]:
        def load() -> Any:
            if isinstance(obj, BaseException):
                raise obj
            return obj

        return load

    eps = [FakeEntryPoint(ep_name, f"{name.replace('-', '_')}.{ep_name}", loader(obj)) for ep_name, obj in plugins.items()]
    return FakeDistribution(name, version, eps)


def host_with(*dists: FakeDistribution, environ: dict[str, str] | None = None, internal: tuple[str, ...] = ()) -> PluginHost:
    return PluginHost(distributions=lambda: list(dists), environ=environ or {}, internal=internal)
