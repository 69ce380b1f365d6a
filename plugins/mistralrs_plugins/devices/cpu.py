"""The CPU device backend."""

from __future__ import annotations

import os
import platform

from mistralrs import hookimpl
from mistralrs.specs import DeviceSpec


def _info() -> dict:
    import torch

    return {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


@hookimpl
def register_devices(register):
    register(DeviceSpec(
        name="cpu",
        device_type="cpu",
        priority=0,
        available=lambda: True,
        info=_info,
        description="host CPU (always available)",
    ))
