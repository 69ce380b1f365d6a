"""What the plugin host records about plugins: who each loaded one is (`PluginInfo`) and how
one failed (`PluginFailure`, reported as a `PluginLoadWarning`). Shared by the host
(`mistralrs.plugins`) and the registry it builds (`mistralrs.registry`)."""

from __future__ import annotations

from typing import Any

import attrs


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded or could not register; it was skipped."""


@attrs.define
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None
    first_party: bool
    plugin: Any = attrs.field(repr=False, default=None)


@attrs.define
class PluginFailure:
    name: str
    distribution: str | None
    version: str | None
    stage: str  # "import" | "validate" | "register"
    error: str

    def message(self) -> str:
        dist = f"{self.distribution} {self.version or ''}".strip() if self.distribution else "no distribution"
        return f"mistralrs plugin {self.name!r} ({dist}) failed to {self.stage} and was skipped: {self.error}"
