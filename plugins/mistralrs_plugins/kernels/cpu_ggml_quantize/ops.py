"""The native GGML quantizer op: the C++ extension (``quantize.cpp``) is built on first use and cached.

Build and failure policy are `kernels.native_build`'s (shared with `cpu_native` and `cpu_quant`): compiled
with ``-O3 -ffp-contract=off -fopenmp`` (no ``-ffast-math``, no ``-march``: the compiler neither fuses nor
reorders float operations, so the bytes are llama.cpp's reference quantizers' on every CPU) into the
platformdirs cache, under a file lock, marked ``BUILD_OK``; when it cannot be built one `NativeKernelWarning`
is issued and the op uses the torch reference for the rest of the process. The op never raises because of
the native path.

``ggml_quantize(qtype, weight) -> uint8 [rows, row_bytes]`` has `formats.quantize`'s contract (type name
first; ``[..., cols]`` weights keep their leading dimensions; the weight is only read, so it may be a
read-only memory map, and may have any strides). fp32/bf16/fp16 CPU weights are quantized natively, on
``torch.get_num_threads()`` threads (1 under ``MISTRALRS_ISQ_SINGLETHREAD``, which the caller sets); anything
else (other dtypes or devices, unknown types, shapes the type cannot take: the reference raises its errors)
goes to the reference registered for the op (the GGML quantizer plugin's ``formats.quantize``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mistralrs_plugins.kernels import native_build
from mistralrs_plugins.kernels.cpu_ggml_quantize import TYPES, native_arch
from mistralrs_plugins.kernels.native_build import NativeKernelWarning as NativeKernelWarning  # re-export
from mistralrs_plugins.kernels.native_build import cache_root, native_disabled  # looked up here (tests patch)

OP = "ggml_quantize"
SOURCES = ("quantize.cpp",)
HEADERS: tuple[str, ...] = ()
CFLAGS = ("-O3", "-DNDEBUG", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
WHAT = "native GGML quantizer"  # in the spinner, the log and the warning

_reference: Callable[..., torch.Tensor] | None = None


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def build_key() -> str:
    return native_build.build_key(source_dir(), SOURCES + HEADERS, CFLAGS, LDFLAGS)


class QuantizeOps:
    """The op of a loaded build (a dispatcher op under the build's own namespace)."""

    def __init__(self, namespace: str, library: Path) -> None:
        self.namespace = namespace
        self.library = library
        self.quantize = getattr(torch.ops, namespace).quantize.default  # (w [rows, cols], qtype id, nthreads)


def build(verbose: bool = False) -> QuantizeOps:
    """Build (or load the cached build of) the extension. Raises on failure."""
    name, library = native_build.build_library(
        prefix="mistralrs_cpu_ggml_quantize", source_dir=source_dir(), sources=SOURCES, headers=HEADERS,
        cflags=CFLAGS, ldflags=LDFLAGS, root=cache_root(), what=WHAT, verbose=verbose,
    )
    return QuantizeOps(name, library)


def _builder() -> QuantizeOps:
    """Indirection so tests can make the build fail."""
    return build()


def _unavailable() -> str | None:
    if native_disabled():
        return f"disabled by {native_build.DISABLE_ENV}"
    if not native_arch():
        return "not an x86-64 or aarch64 CPU"
    return None


# Built on first use. stacklevel: a failed build's warning points at the caller of the op (op -> _native);
# `_builder` is looked up at the call, so that tests can patch it.
_lazy: native_build.LazyExtension[QuantizeOps] = native_build.LazyExtension(
    lambda: _builder(), _unavailable, WHAT, stacklevel=2)
extension = _lazy.get
_native = _lazy.native
_reset_for_tests = _lazy.reset


def status() -> dict[str, Any]:
    """For diagnostics: whether the native path is on, and why not."""
    return {**_lazy.status(), "cache": str(cache_root())}


def reference() -> Callable[..., torch.Tensor]:
    """The reference implementation registered for the op (the GGML quantizer plugin's `formats.quantize`)."""
    global _reference
    fn = _reference
    if fn is None:
        from mistralrs.plugins import get_registry
        from mistralrs.specs import resolve

        fn = _reference = resolve(get_registry().reference_kernel(OP).impl)
    return fn


_W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _takes(qtype: str, weight: torch.Tensor) -> tuple[int, int] | None:
    """(type id, cols) when the native op computes this call, else None."""
    fmt = TYPES.get(qtype) if isinstance(qtype, str) else None
    if fmt is None or weight.dtype not in _W_DTYPES or not weight.is_cpu or weight.dim() < 1:
        return None
    cols = weight.shape[-1]
    if cols <= 0 or cols % fmt[0]:
        return None  # the reference raises its error
    return fmt[2], cols


def ggml_quantize(qtype: str, weight: torch.Tensor) -> torch.Tensor:
    """Quantize `weight` ``[rows, cols]`` (or ``[..., cols]``) to GGML type `qtype`: ``uint8 [rows, row_bytes]``,
    byte for byte what `formats.quantize(qtype, weight)` (and llama.cpp's ``quantize_row_*_ref``) give."""
    taken = _takes(qtype, weight)
    if taken is not None:
        ext = _native()
        if ext is not None:
            type_id, cols = taken
            w = weight.detach()
            if w.dim() == 2:
                return ext.quantize(w, type_id, torch.get_num_threads())
            lead = tuple(w.shape[:-1])
            out = ext.quantize(w.reshape(-1, cols), type_id, torch.get_num_threads())
            return out.reshape(*lead, out.shape[-1])
    return reference()(qtype, weight)
