"""The Apple Metal (MPS) device backend."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import DeviceSpec


def _available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@hookimpl
def register_devices(register):
    register(DeviceSpec(
        name="mps",
        device_type="mps",
        priority=50,
        available=_available,
        description="Apple GPUs through torch.mps",
    ))
