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


def lookup_accelerated(op: str, device: Any = "cpu", registry: Any = None) -> Callable[..., Any] | None:
    """The kernel selected for `op` on `device` when it is not the torch reference (e.g. Triton on cuda), else
    None: for callers that keep a path of their own where only the reference would run."""
    from mistralrs.errors import NoCandidateError, NotFoundError

    try:
        if registry is None:
            from mistralrs.plugins import get_registry

            registry = get_registry()
        spec = registry.kernel(op, device_type_of(device))
    except (NoCandidateError, NotFoundError):
        return None
    return None if spec.reference else lookup_kernel(op, device, registry)


def _ref(name: str) -> Callable[[], Callable[..., Any]]:
    def get() -> Callable[..., Any]:
        from mistralrs.nn import torch_ops

        return getattr(torch_ops, name)

    return get


_REFERENCE = {op: _ref(op) for op in ("rms_norm", "fused_add_rms_norm", "rotary", "silu_and_mul", "gelu_and_mul",
                                       "linear_bf16", "paged_attention_decode", "paged_attention_prefill",
                                       "moe_experts", "kv_cache_write")}


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


def kernel_report(registry: Any, device: str) -> dict[str, dict[str, Any]]:
    """Per op registered for `device`: the kernel selected (``active``, None when none) and, for every
    other implementation, why it is not (its `why_unsupported`, or a lower priority). What `mistralrs
    doctor` and `mistralrs plugins` print."""
    report: dict[str, dict[str, Any]] = {}
    for op in sorted({k.op for k in registry.kernels if device in k.devices}):
        try:
            chosen = registry.kernel(op, device)
            active, reference = chosen.name, chosen.reference
        except Exception:  # noqa: BLE001 - no kernel for this op here
            active, reference = None, False
        inactive: dict[str, str] = {}
        for spec in sorted((k for k in registry.kernels if k.op == op and device in k.devices),
                           key=lambda s: (-s.priority, s.name)):
            if spec.name == active or spec.reference:  # the reference: the fallback, no reason to give
                continue
            try:
                supported = spec.is_supported(device=device)
            except Exception as exc:  # noqa: BLE001
                inactive[spec.name] = f"its check failed ({type(exc).__name__}: {exc})"
                continue
            if supported:
                inactive[spec.name] = f"lower priority than {active}"
                continue
            why = None
            if spec.why_unsupported is not None:
                try:
                    why = spec.why_unsupported(device)
                except Exception as exc:  # noqa: BLE001
                    why = f"{type(exc).__name__}: {exc}"
            inactive[spec.name] = why or "does not support this machine"
        report[op] = {"active": active, "reference": reference, "inactive": inactive}
    return report


def kernel_summary(report: dict[str, dict[str, Any]]) -> list[str]:
    """`kernel_report` as lines: the kernels selected over the reference, the ops left to the reference,
    then each kernel not used with its reasons."""
    fast = [f"{op}={r['active']}" for op, r in report.items() if r["active"] and not r["reference"]]
    plain = [op for op, r in report.items() if r["reference"]]
    missing = [op for op, r in report.items() if r["active"] is None]
    lines = ["active: " + (", ".join(fast) or "none but the torch reference")
             + (f"; torch reference for the other {len(plain)} ops" if fast and plain else "")]
    if missing:
        lines.append("no kernel for " + ", ".join(missing))
    reasons: dict[str, dict[str, list[str]]] = {}
    for op, r in report.items():
        for name, why in r["inactive"].items():
            reasons.setdefault(name, {}).setdefault(why, []).append(op)
    for name, whys in sorted(reasons.items()):
        for why, ops in whys.items():
            lines.append(f"{name} not used for {', '.join(ops)}: {why}")
    return lines
