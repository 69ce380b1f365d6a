"""Kernel lookup for layers: the registered implementation of a named op for a device type,
resolved once at layer construction. Falls back to the torch reference ops when no registry
entry can be found (e.g. the first-party plugins are blocked)."""

from __future__ import annotations

from typing import Any, Callable


def device_type_of(device: Any) -> str:
    if device is None:
        return "cpu"
    t = getattr(device, "type", None)
    if t is not None:
        return t
    return str(device).split(":", 1)[0]


def lookup_kernel(op: str, device: Any = "cpu", registry: Any = None) -> Callable[..., Any]:
    """The best implementation of `op` for `device` (a device, device string or type)."""
    from mistralrs.specs import resolve

    kind = device_type_of(device)
    if kind == "meta":
        kind = "cpu"
    try:
        if registry is None:
            from mistralrs.plugins import get_registry

            registry = get_registry()
        return resolve(registry.kernel(op, kind).impl)
    except Exception:  # noqa: BLE001 - no registry / no kernel: the built-in reference
        from mistralrs.errors import NoCandidateError

        fallback = _REFERENCE.get(op)
        if fallback is None:
            raise NoCandidateError(f"no kernel implements {op!r} on {kind!r}") from None
        return fallback()


def _ref(name: str) -> Callable[[], Callable[..., Any]]:
    def get() -> Callable[..., Any]:
        from mistralrs_plugins.kernels import torch_ops

        return getattr(torch_ops, name)

    return get


_REFERENCE = {op: _ref(op) for op in ("rms_norm", "rotary", "silu_and_mul", "gelu_and_mul")}
