"""What every Triton kernel plugin shares: whether Triton kernels can claim a device, and why not.

Not a plugin (no entry point): the ``triton_*`` kernel plugins import it to register. Importing it
is cheap: no torch, no triton (they are imported inside the functions, at selection time).

A Triton kernel claims ``cuda`` only when it can compile there: triton importable, a CUDA (or ROCm)
device present, compute capability 7.0+, not interpreter mode, not disabled. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors through the interpreter (exact semantics, far
slower than torch): that mode is for tests, which call the kernels directly, so no device is claimed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

from mistralrs.specs import KernelSpec

DISABLE_ENV = "MISTRALRS_NO_TRITON_KERNELS"
INTERPRET_ENV = "TRITON_INTERPRET"
PRIORITY = 10  # above the torch reference (0)
MIN_CAPABILITY = (7, 0)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def triton_disabled() -> bool:
    return _flag(DISABLE_ENV)


def interpreter_mode() -> bool:
    return _flag(INTERPRET_ENV)


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _cuda_problem() -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not importable"
    if not torch.cuda.is_available():
        build = "torch is a CPU-only build" if not (torch.version.cuda or getattr(torch.version, "hip", None)) \
            else "no GPU found"
        return f"no CUDA device ({build})"
    if not getattr(torch.version, "hip", None):
        cap = torch.cuda.get_device_capability()
        if tuple(cap) < MIN_CAPABILITY:
            return (f"compute capability {cap[0]}.{cap[1]} (Triton needs "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+)")
    return None


def why_not(device: str = "cuda", **_context: Any) -> str | None:
    """Why the Triton kernels do not claim `device`, or None when they do."""
    if device != "cuda":
        return f"Triton kernels run on cuda only, not {device}"
    if triton_disabled():
        return f"disabled by {DISABLE_ENV}"
    if not triton_installed():
        return "triton is not installed (pip install 'mistralrs[cuda]')"
    if interpreter_mode():
        return f"{INTERPRET_ENV}=1: interpreter mode runs kernels on CPU tensors for tests only"
    return _cuda_problem()


def supports_cuda(device: str = "cuda", **context: Any) -> bool:
    return why_not(device, **context) is None


def register_ops(register: Callable[[KernelSpec], Any], module: str, ops: dict[str, str]) -> None:
    """Register `module:<op>` as the Triton kernel of each op (named ``triton``, device cuda)."""
    for op, description in ops.items():
        register(KernelSpec(
            name="triton",
            op=op,
            impl=f"{module}:{op}",
            devices=("cuda",),
            priority=PRIORITY,
            supports=supports_cuda,
            why_unsupported=why_not,
            description=f"Triton {description}",
        ))


def runs_here(*tensors: Any) -> bool:
    """True when a Triton kernel can run on these tensors now: on a GPU, or on the CPU in interpreter mode
    (tests). Inputs needing autograd go to the reference."""
    for t in tensors:
        if t is None:
            continue
        if t.requires_grad:
            return False
        kind = t.device.type
        if kind == "cpu":
            if not interpreter_mode():
                return False
        elif kind != "cuda":
            return False
    return True
