"""The CUDA device backend (NVIDIA and ROCm builds of torch)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import DeviceSpec


def _available() -> bool:
    import torch

    return torch.cuda.is_available()


def unavailable_reason() -> str | None:
    """Why CUDA is not usable here (None when it is): a CPU-only torch build, or no GPU found."""
    import torch

    if torch.cuda.is_available():
        return None
    if not (torch.version.cuda or getattr(torch.version, "hip", None)):
        return f"torch {torch.__version__} is a CPU-only build"
    return "no GPU found (check the driver and CUDA_VISIBLE_DEVICES)"


def _info() -> dict:
    import torch

    why = unavailable_reason()
    if why:
        return {"devices": [], "unavailable": why}
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append({
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "memory_bytes": total,
            "free_bytes": free,
        })
    return {"devices": devices}


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
