"""The CUDA device backend (NVIDIA and ROCm builds of torch)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import DeviceSpec


def _available() -> bool:
    import torch

    return torch.cuda.is_available()


def _info() -> dict:
    import torch

    return {
        "devices": [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
            }
            for i in range(torch.cuda.device_count())
        ]
    }


@hookimpl
def register_devices(register):
    register(DeviceSpec(
        name="cuda",
        device_type="cuda",
        priority=100,
        available=_available,
        info=_info,
        description="NVIDIA/AMD GPUs through torch.cuda",
    ))
