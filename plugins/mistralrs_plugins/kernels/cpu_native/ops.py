"""Native CPU ops: the C++ extension is built on first use and cached.

Build: `native_build.build_library` on the sources next to this file, with AVX-512-BF16 flags, into
``<platformdirs user cache>/mistralrs/kernels/<key>`` where ``key`` hashes the sources and headers,
the flags, the torch version and the Python version (file lock, ``BUILD_OK`` marker, cached
library loaded directly by later processes). The library registers its ops with torch's
dispatcher under a namespace named after the build key (no Python bindings, so it compiles in
seconds).

Failure policy (`native_build.resolve`): if the extension cannot be built or imported (no
compiler, no ninja, an unsupported CPU, ``MISTRALRS_NO_NATIVE_KERNELS`` set), one warning is
issued and every op falls back to torch for the rest of the process. An op never raises because
of the native path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mistralrs.nn import torch_ops
from mistralrs_plugins.kernels import native_build
from mistralrs_plugins.kernels.cpu_native import has_avx2_only, has_avx512_bf16, native_disabled
from mistralrs_plugins.kernels.native_build import NativeKernelWarning as NativeKernelWarning  # re-export
from mistralrs_plugins.kernels.native_build import cache_root  # looked up here: tests monkeypatch it

SOURCES = ("linear_bf16.cpp", "linear_amx.cpp", "decode_ops.cpp")
HEADERS = ("simd.h", "decode_ops_api.h", "../thread_pool.h")  # not compiled on their own, but part of the build key
CFLAGS = ("-O3", "-DNDEBUG", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp")
LDFLAGS = ("-fopenmp",)
WHAT = "native CPU kernels"  # in the spinner, the log and the warning


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def build_key() -> str:
    """Hash of everything the binary depends on: sources, flags, torch and Python versions."""
    return native_build.build_key(source_dir(), SOURCES + HEADERS, CFLAGS, LDFLAGS)


class NativeOps:
    """The ops of a loaded build (dispatcher ops under the build's own namespace)."""

    def __init__(self, namespace: str, library: Path) -> None:
        self.namespace = namespace
        self.library = library
        ns = getattr(torch.ops, namespace)
        self.linear_bf16 = ns.linear_bf16.default
        self.rms_norm = ns.rms_norm.default
        self.silu_and_mul = ns.silu_and_mul.default
        self.rotary = ns.rotary.default
        self.paged_attention_decode = ns.paged_attention_decode.default
        self.paged_attention_prefill = ns.paged_attention_prefill.default
        self.linear_bf16_amx = ns.linear_bf16_amx.default
        self.amx_available = ns.amx_available.default


def build(verbose: bool = False) -> NativeOps:
    """Build (or load the cached build of) the extension. Raises on failure."""
    name, library = native_build.build_library(
        prefix="mistralrs_cpu_native", source_dir=source_dir(), sources=SOURCES, headers=HEADERS,
        cflags=CFLAGS, ldflags=LDFLAGS, root=cache_root(), what=WHAT, verbose=verbose,
    )
    return NativeOps(name, library)


def _builder() -> NativeOps:
    """Indirection so tests can make the build fail."""
    return build()


def _unavailable() -> str | None:
    if native_disabled():
        return "disabled by MISTRALRS_NO_NATIVE_KERNELS"
    if not has_avx512_bf16():
        return "this CPU has no avx512_bf16"
    return None


# Built on first use. stacklevel: a failed build's warning points at the caller of the op (op -> _native);
# `_builder` is looked up at the call, so that tests can patch it.
_lazy: native_build.LazyExtension[NativeOps] = native_build.LazyExtension(
    lambda: _builder(), _unavailable, WHAT, stacklevel=2)
extension = _lazy.get
_native = _lazy.native
_reset_for_tests = _lazy.reset


def status() -> dict[str, Any]:
    """For diagnostics: whether the native path is on, and why not."""
    return {**_lazy.status(), "cache": str(cache_root())}


# The per-token ops and decode attention for AVX2 CPUs without AVX-512-BF16: a library of its own
# (decode_ops_avx2.cpp, the same op signatures), built on first use like the AVX-512 one.
AVX2_SOURCES = ("decode_ops_avx2.cpp",)
AVX2_HEADERS = ("decode_ops_api.h", "../thread_pool.h")
AVX2_CFLAGS = ("-O3", "-DNDEBUG", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
AVX2_WHAT = "native CPU kernels (AVX2)"


class NativeOpsAvx2:
    def __init__(self, namespace: str, library: Path) -> None:
        self.namespace = namespace
        self.library = library
        ns = getattr(torch.ops, namespace)
        self.rms_norm = ns.rms_norm.default
        self.silu_and_mul = ns.silu_and_mul.default
        self.rotary = ns.rotary.default
        self.paged_attention_decode = ns.paged_attention_decode.default
        self.paged_attention_prefill = ns.paged_attention_prefill.default


def build_avx2(verbose: bool = False) -> NativeOpsAvx2:
    name, library = native_build.build_library(
        prefix="mistralrs_cpu_native_avx2", source_dir=source_dir(), sources=AVX2_SOURCES, headers=AVX2_HEADERS,
        cflags=AVX2_CFLAGS, ldflags=LDFLAGS, root=cache_root(), what=AVX2_WHAT, verbose=verbose,
    )
    return NativeOpsAvx2(name, library)


def _unavailable_avx2() -> str | None:
    if native_disabled():
        return "disabled by MISTRALRS_NO_NATIVE_KERNELS"
    if not has_avx2_only():
        return "this CPU has no avx2/fma/f16c (or has avx512_bf16: the AVX-512 library serves it)"
    return None


_lazy_avx2: native_build.LazyExtension[NativeOpsAvx2] = native_build.LazyExtension(
    lambda: build_avx2(), _unavailable_avx2, AVX2_WHAT, stacklevel=3)
_native_avx2 = _lazy_avx2.native


def _plain_cpu(*tensors: torch.Tensor) -> bool:
    """CPU tensors outside autograd and compilation: what every native op needs."""
    for t in tensors:  # a loop, not all(genexpr): this runs several times per layer and decode token
        if not t.is_cpu or t.requires_grad:
            return False
    return not torch.compiler.is_compiling()


_FLOAT_KINDS = (torch.bfloat16, torch.float32)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (as float32 with `out_f32`); bf16 inputs on CPU use the AVX-512-BF16
    kernel, whose rows come out the same whatever else is in the batch (decode and prefill alike).
    Anything else (other dtypes, autograd, compiling, no native build) is the torch reference."""
    if (
        x.dtype is not torch.bfloat16
        or weight.dtype is not torch.bfloat16
        or x.device.type != "cpu"
        or weight.dim() != 2
        or x.dim() == 0
        or x.requires_grad
        or weight.requires_grad
        or not weight.is_contiguous()
    ):
        return torch_ops.linear_bf16(x, weight, bias, out_f32=out_f32)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows < 1 or k != weight.shape[1] or torch.compiler.is_compiling():
        return torch_ops.linear_bf16(x, weight, bias, out_f32=out_f32)
    if bias is not None and (bias.device.type != "cpu" or bias.requires_grad):
        return torch_ops.linear_bf16(x, weight, bias, out_f32=out_f32)
    ext = _native()
    if ext is None:
        return torch_ops.linear_bf16(x, weight, bias, out_f32=out_f32)
    y = ext.linear_bf16(x.reshape(rows, k), weight, bias, out_f32)
    return y.view(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else y


_amx: bool | None = None  # whether the OS lets this process use AMX tile data (asked once)


def linear_bf16_amx(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    out_f32: bool = False) -> torch.Tensor:
    """`linear_bf16` on AMX tiles (``tdpbf16ps``) where the layer takes them (bf16, K and N multiples of 32: the
    layer's shape decides, never the batch), batch-invariant; every other call is `linear_bf16`."""
    global _amx
    if (
        x.dtype is torch.bfloat16
        and weight.dtype is torch.bfloat16
        and weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and weight.shape[1] % 32 == 0
        and weight.shape[0] % 32 == 0
        and weight.is_contiguous()
        and _plain_cpu(x, weight)
        and (bias is None or _plain_cpu(bias))
    ):
        ext = _native()
        if ext is not None:
            if _amx is None:
                _amx = bool(ext.amx_available())
            if _amx:
                k = x.shape[-1]
                rows = x.numel() // k if k else 0
                if rows >= 1:
                    y = ext.linear_bf16_amx(x.reshape(rows, k), weight, bias, out_f32)
                    return y.view(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else y
    return linear_bf16(x, weight, bias, out_f32=out_f32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add_unit_offset: bool = False, *,
             native=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`torch_ops.rms_norm` with AVX-512 for bf16/fp32 CPU tensors (fp32 math, one rounding). `native`: the
    library to use (the AVX2 one for the ``_avx2`` ops), the AVX-512 one by default."""
    if x.dtype in _FLOAT_KINDS and x.dim() >= 1 and x.shape[-1] == weight.numel() and _plain_cpu(x, weight):
        ext = (native or _native)()
        if ext is not None:
            return ext.rms_norm(x, weight, float(eps), bool(add_unit_offset))
    return torch_ops.rms_norm(x, weight, eps, add_unit_offset)


def silu_and_mul(x: torch.Tensor, *, native=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`torch_ops.silu_and_mul` (``silu(gate) * up`` for ``x = [gate | up]``) with AVX-512 for bf16/fp32."""
    if x.dtype in _FLOAT_KINDS and x.dim() >= 1 and x.shape[-1] % 2 == 0 and _plain_cpu(x):
        ext = (native or _native)()
        if ext is not None:
            return ext.silu_and_mul(x)
    return torch_ops.silu_and_mul(x)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
           interleaved: bool = False, *, native=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`torch_ops.rotary` with AVX-512 for bf16/fp32 ``x [T, H, D]`` (fp32 math, one rounding)."""
    d = rotary_dim or (x.shape[-1] if x.dim() else 0)
    if (
        x.dtype in _FLOAT_KINDS
        and x.dim() == 3
        and x.stride(-1) == 1
        and d % 2 == 0
        and 0 < d <= x.shape[-1]
        and cos.numel() == x.shape[0] * (d // 2) == sin.numel()
        and _plain_cpu(x, cos, sin)
    ):
        ext = (native or _native)()
        if ext is not None:
            return ext.rotary(x, cos, sin, int(d), bool(interleaved))
    return torch_ops.rotary(x, cos, sin, rotary_dim, interleaved)


def _native_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      sinks: torch.Tensor | None) -> bool:
    """What the attention kernels take: bf16/fp32 caches of q's dtype with contiguous head dims, no sinks."""
    return (sinks is None and q.dtype in _FLOAT_KINDS and k_cache.dtype is q.dtype and v_cache.dtype is q.dtype
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None, *, native=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`torch_ops.paged_attention_decode` reading K/V in place through the block tables (bf16/fp32 caches;
    fp8 caches and attention sinks use the reference)."""
    if _native_attention(q, k_cache, v_cache, sinks) and _plain_cpu(q, k_cache, v_cache, block_tables, seq_lens):
        ext = (native or _native)()
        if ext is not None:
            return ext.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, int(block_size),
                                              float(scale), int(sliding_window or 0), float(softcap or 0.0))
    return torch_ops.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale,
                                            sliding_window, softcap, sinks)


def _index_tensor(values) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A list of ints (or a tensor) as a CPU int64 tensor for the native op."""
    if isinstance(values, torch.Tensor):
        return values if values.device.type == "cpu" else values.cpu()
    return torch.tensor(values, dtype=torch.long)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens, query_start_loc, block_size: int,  # type: ignore[no-untyped-def]
                            scale: float, sliding_window: int | None = None, softcap: float | None = None,
                            sinks: torch.Tensor | None = None, *, native=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`torch_ops.paged_attention_prefill` with each new token a row of the decode kernel (its own length:
    causal), reading K/V in place; a token's result is the one decode would give it. fp8 caches and
    attention sinks use the reference."""
    if _native_attention(q, k_cache, v_cache, sinks) and _plain_cpu(q, k_cache, v_cache, block_tables):
        ext = (native or _native)()
        if ext is not None:
            return ext.paged_attention_prefill(q, k_cache, v_cache, block_tables, _index_tensor(seq_lens),
                                               _index_tensor(query_start_loc), int(block_size), float(scale),
                                               int(sliding_window or 0), float(softcap or 0.0))
    return torch_ops.paged_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                             block_size, scale, sliding_window, softcap, sinks)


# The AVX2 library's ops (CPUs without AVX-512-BF16): the same wrappers and fallbacks.
def rms_norm_avx2(x: torch.Tensor, weight: torch.Tensor, eps: float, add_unit_offset: bool = False) -> torch.Tensor:
    return rms_norm(x, weight, eps, add_unit_offset, native=_native_avx2)


def silu_and_mul_avx2(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(x, native=_native_avx2)


def rotary_avx2(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None,
                interleaved: bool = False) -> torch.Tensor:
    return rotary(x, cos, sin, rotary_dim, interleaved, native=_native_avx2)


def paged_attention_decode_avx2(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                                sliding_window: int | None = None, softcap: float | None = None,
                                sinks: torch.Tensor | None = None) -> torch.Tensor:
    return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, sliding_window,
                                  softcap, sinks, native=_native_avx2)


def paged_attention_prefill_avx2(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, seq_lens, query_start_loc, block_size: int,  # type: ignore[no-untyped-def]
                                 scale: float, sliding_window: int | None = None, softcap: float | None = None,
                                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scale,
                                   sliding_window, softcap, sinks, native=_native_avx2)
