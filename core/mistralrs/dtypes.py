"""Dtype names and the "auto" dtype choice.

`resolve_dtype("auto", device)` is bf16 where the device computes bf16 natively (CPUs with
AVX512-BF16 or AMX, CUDA compute capability 8.0+) and f32 elsewhere (older CPUs and GPUs, MPS):
emulated bf16 is slower than f32. Ask for "f16" explicitly on pre-Ampere GPUs.
"""

from __future__ import annotations

import functools
from typing import Any

from mistralrs.errors import ConfigError

_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "f16": "float16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "f32": "float32",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}

SUPPORTED_DTYPE_NAMES = ("auto", "bf16", "f16", "f32", "bfloat16", "float16", "float32", "half")


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    return getattr(device, "type", None) or str(device).split(":", 1)[0]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX", "AVX512_AMX")
    except Exception:  # noqa: BLE001 - probing must not fail a load
        return False


def _cuda_bf16(device: Any) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    idx = getattr(device, "index", None)
    if idx is None and isinstance(device, str) and ":" in device:
        idx = int(device.split(":", 1)[1])
    major, _ = torch.cuda.get_device_capability(idx or 0)
    return major >= 8


def auto_dtype(device: Any = "cpu"):
    """The dtype "auto" means on a device."""
    import torch

    kind = _device_type(device)
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if kind == "cuda":
        return torch.bfloat16 if _cuda_bf16(device) else torch.float32
    return torch.float32


def resolve_dtype(dtype: Any = "auto", device: Any = "cpu"):
    """"auto" | "bf16" | "f16" | "f32" | long names | a torch.dtype -> torch.dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point dtype; use one of {', '.join(SUPPORTED_DTYPE_NAMES)}")
        return dtype
    if dtype is None:
        dtype = "auto"
    if not isinstance(dtype, str):
        raise ConfigError(f"dtype {dtype!r} is not understood; use one of {', '.join(SUPPORTED_DTYPE_NAMES)}")
    key = dtype.strip().lower().removeprefix("torch.")
    if key == "auto":
        return auto_dtype(device)
    name = _NAMES.get(key)
    if name is None:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bf16" (short names, as the CLI prints them)."""
    s = str(dtype).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(s, s)
