"""Kernel lookup for layers: the registered implementation of a named op for a device type,
resolved once at layer construction. Falls back to the torch reference ops when no registry
entry can be found (e.g. the first-party plugins are blocked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
    from mistralrs.errors import NoCandidateError, NotFoundError

    fallback = _REFERENCE.get(op)
    try:
        if registry is None:
            from mistralrs.plugins import get_registry

            registry = get_registry()
        spec = registry.kernel(op, kind)
    except (NoCandidateError, NotFoundError):
        if fallback is None:
            raise
        return fallback()  # e.g. the torch reference plugin is blocked: use it directly
    try:
        return resolve(spec.impl)
    except Exception as exc:  # noqa: BLE001 - a broken kernel plugin must not break model loading
        if fallback is None:
            raise
        import warnings

        warnings.warn(
            f"kernel {op}/{spec.name} could not be imported ({type(exc).__name__}: {exc}); using the torch reference",
            RuntimeWarning,
            stacklevel=3,
        )
        return fallback()


def _ref(name: str) -> Callable[[], Callable[..., Any]]:
    def get() -> Callable[..., Any]:
        from mistralrs.nn import torch_ops

        return getattr(torch_ops, name)

    return get


_REFERENCE = {op: _ref(op) for op in ("rms_norm", "fused_add_rms_norm", "rotary", "silu_and_mul", "gelu_and_mul",
                                       "linear_bf16", "paged_attention_decode")}


_registered_references: dict[str, Callable[..., Any]] = {}


def lookup_reference(op: str) -> Callable[..., Any]:
    """The torch reference registered for `op` (cached): where a kernel sends the inputs it does not take,
    for ops whose reference lives in a plugin (e.g. the GGML quantizer's ``qmatmul_<type>``)."""
    fn = _registered_references.get(op)
    if fn is None:
        from mistralrs.plugins import get_registry
        from mistralrs.specs import resolve

        fn = _registered_references[op] = resolve(get_registry().reference_kernel(op).impl)
    return fn
