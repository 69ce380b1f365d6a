"""The built-in web chat UI (`serve --ui`, at `/ui`): a small static app with no build step
and no CDN, served by the `serve` server and talking to its `/v1` API.

Registering imports neither aiohttp nor torch; `routes.py` mounts `static/` (`FrontendSpec.mount`,
only when `--ui` asks for it).
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import FrontendSpec


@hookimpl
def register_frontends(register):
    register(FrontendSpec(
        name="webui",
        mount="mistralrs_plugins.frontends.webui.routes:mount",
        mount_by_default=False,
        description="web chat UI at /ui on the `serve` server (`serve --ui`): static, offline, no build step",
    ))
