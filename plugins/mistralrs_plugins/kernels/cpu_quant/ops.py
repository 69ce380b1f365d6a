"""The AVX2 quantized matmul ops: the C++ extension (``qmatmul.cpp``) is built on first use and cached.

Build and failure policy are `kernels.native_build`'s (shared with `cpu_native`): compiled with
``-O3 -mavx2 -mfma -mf16c -fopenmp`` (and ``-ffp-contract=off``: every fused multiply-add is written
out, so the arithmetic of an output is the same in every schedule) into the platformdirs cache,
under a file lock, marked ``BUILD_OK``; when it cannot be built one `NativeKernelWarning` is
issued and every op uses the torch reference for the rest of the process. An op never raises
because of the native path.

``linear_bf16(x[..., K], weight bf16[N, K], bias[N] | None, *, out_f32=False)`` is the bf16 linear for
AVX2 CPUs (fp32 arithmetic, batch-invariant); what it does not take (other dtypes, non-contiguous
weights, K not a multiple of 16, autograd) goes to the torch reference (`nn.torch_ops.linear_bf16`).

Every op is ``qmatmul_<type>(x[..., K], qweight uint8[N, K / block * bytes], bias[N] | None, *,
out_f32=False) -> y[..., N]`` in x's dtype (fp32 with `out_f32`); x is bf16 or fp32. Inputs the
kernel does not take (other dtypes, autograd, other devices, torch.compile tracing, shapes that
do not match the blocks) go to the reference registered for the op (the GGML quantizer plugin's
dequantize-then-matmul).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mistralrs.nn import torch_ops
from mistralrs.nn.kernels import lookup_reference
from mistralrs_plugins.kernels import native_build
from mistralrs_plugins.kernels.cpu_quant import FORMATS, has_avx2, has_avx512_vnni, has_avx_vnni
from mistralrs_plugins.kernels.native_build import NativeKernelWarning as NativeKernelWarning  # re-export
from mistralrs_plugins.kernels.native_build import cache_root, native_disabled  # looked up here (tests patch)

# The formats whose AVX2 tiles also take W interleaved by INTERLEAVE rows (that module's layout).
from mistralrs_plugins.quant.ggml.interleave import ROWS as INTERLEAVE
from mistralrs_plugins.quant.ggml.interleave import TYPES as INTERLEAVED
from mistralrs_plugins.quant.ggml.interleave import row_bytes as interleave_row_bytes

SOURCES = ("qmatmul.cpp", "qmatmul_avx512.cpp", "qmatmul_avxvnni.cpp", "interleave.cpp", "linear_bf16.cpp")
HEADERS = ("avx2_common.h", "qmatmul.h", "qmatmul_interleaved.h", "../thread_pool.h")
CFLAGS = ("-O3", "-DNDEBUG", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
WHAT = "native quantized CPU kernels"  # in the spinner, the log and the warning


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def build_key() -> str:
    return native_build.build_key(source_dir(), SOURCES + HEADERS, CFLAGS, LDFLAGS)


class QuantOps:
    """The ops of a loaded build (dispatcher ops under the build's own namespace)."""

    def __init__(self, namespace: str, library: Path) -> None:
        self.namespace = namespace
        self.library = library
        ns = getattr(torch.ops, namespace)
        self.qmatmul = ns.qmatmul.default  # (x, qweight, bias, qtype, out_f32)
        self.qmatmul_vnni = ns.qmatmul_vnni.default  # the same with the AVX-512 VNNI tiles (raises without them)
        # qmatmul with AVX-VNNI in the interleaved tiles where the CPU has it (the same results bit for bit)
        self.qmatmul_avxvnni = ns.qmatmul_avxvnni.default
        # interleaved W: the VNNI tiles' arithmetic emulated with AVX2 (their results bit for bit; for tests)
        self.qmatmul_vnni_emulated = ns.qmatmul_vnni_emulated.default
        self.quantize_act = ns.quantize_act.default  # (x fp32 [M, K], k_blocks) -> (qs, d, bsums16)
        self.ggml_interleave = ns.ggml_interleave.default  # (canonical uint8 [N, row bytes], qtype) -> interleaved
        self.linear_bf16 = ns.linear_bf16.default  # (x [M, K], weight bf16 [N, K], bias, out_f32)
        self.qmatmul_affine = ns.qmatmul_affine.default  # (x, packed, bias, bits, pairs, vnni, out_f32)
        self.linear_fp8 = ns.linear_fp8.default  # (x, weight u8 [N, K], scale, block_n, block_k, bias, out_f32)
        self.linear_int8 = ns.linear_int8.default  # (x, weight i8 [N, K], scale, block_n, block_k, bias, out_f32)
        self.linear_lut4 = ns.linear_lut4.default  # (x, packed u8 [N, K/2], table, scale, bn, bk, bias, out_f32)


def build(verbose: bool = False) -> QuantOps:
    """Build (or load the cached build of) the extension. Raises on failure."""
    name, library = native_build.build_library(
        prefix="mistralrs_cpu_quant", source_dir=source_dir(), sources=SOURCES, headers=HEADERS,
        cflags=CFLAGS, ldflags=LDFLAGS, root=cache_root(), what=WHAT, verbose=verbose,
    )
    return QuantOps(name, library)


def _builder() -> QuantOps:
    """Indirection so tests can make the build fail."""
    return build()


def _unavailable() -> str | None:
    if native_disabled():
        return f"disabled by {native_build.DISABLE_ENV}"
    if not has_avx2():
        return "this CPU lacks avx2/fma/f16c"
    return None


# Built on first use. stacklevel: a failed build's warning points at the caller of the op (op -> _qmatmul / _affine / _linear / _block_scaled -> _native);
# `_builder` is looked up at the call, so that tests can patch it.
_lazy: native_build.LazyExtension[QuantOps] = native_build.LazyExtension(
    lambda: _builder(), _unavailable, WHAT, stacklevel=3)
extension = _lazy.get
_native = _lazy.native
_reset_for_tests = _lazy.reset


def status() -> dict[str, Any]:
    """For diagnostics: whether the native path is on, and why not."""
    return {**_lazy.status(), "cache": str(cache_root())}


def reference(op: str) -> Callable[..., torch.Tensor]:
    """The reference implementation registered for `op` (the GGML quantizer plugin's)."""
    return lookup_reference(op)


_X_DTYPES = (torch.float32, torch.bfloat16)



def _kernel_takes(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None, elems: int,
                  row_bytes: int, rows: int = 1) -> bool:
    """Whether the kernel computes this call (cheap checks only: this runs for every decode matmul). `rows`:
    W's rows per row of `qweight` (8: interleaved, quant/ggml/interleave.py), of `row_bytes` bytes."""
    k = x.shape[-1] if x.dim() else 0
    return k != 0 and k % elems == 0 and qweight.dim() == 2 and qweight.shape[1] == row_bytes and \
        _operands_take(x, qweight, bias, rows)


def _operands_take(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None, rows: int = 1) -> bool:
    """The dtype, device and layout checks of every quantized kernel (not the row length)."""
    shape = x.shape
    if (
        not shape
        or x.dtype not in _X_DTYPES
        or not x.is_cpu
        or x.requires_grad
        or qweight.dtype is not torch.uint8
        or not qweight.is_cpu
        or qweight.dim() != 2
        or not qweight.is_contiguous()
    ):
        return False
    if bias is not None and (not bias.is_cpu or bias.requires_grad or bias.numel() != qweight.shape[0] * rows):
        return False
    return not torch.compiler.is_compiling()


def _qmatmul(name: str, x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None,
             out_f32: bool, vnni: bool = False) -> torch.Tensor:
    elems, nbytes, _act, qtype = FORMATS[name]
    k = x.shape[-1] if x.dim() else 0
    row_bytes = k // elems * nbytes
    rows = 1
    # W interleaved by INTERLEAVE rows (the q4_0, q4_K and q5_K tiles of both instruction sets), else canonical
    if name in INTERLEAVED and qweight.dim() == 2 and qweight.shape[-1] != row_bytes:
        rows, row_bytes = INTERLEAVE, interleave_row_bytes(name, k)
    if _kernel_takes(x, qweight, bias, elems, row_bytes, rows) and (not vnni or has_avx512_vnni()):
        ext = _native()
        if ext is not None:
            op = ext.qmatmul_vnni if vnni else ext.qmatmul_avxvnni if rows > 1 and has_avx_vnni() else ext.qmatmul
            if x.dim() == 2:
                return op(x, qweight, bias, qtype, out_f32)
            shape = x.shape
            y = op(x.reshape(-1, shape[-1]), qweight, bias, qtype, out_f32)
            return y.view(*shape[:-1], qweight.shape[0] * rows)
    return reference(f"qmatmul_{name}")(x, qweight, bias, out_f32=out_f32)


def qmatmul_q4_0(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 out_f32: bool = False) -> torch.Tensor:
    """``x @ dequant(W).T + b`` for q4_0 weights (x quantized to q8_0 per row, int8 dot products). W canonical
    [N, row_bytes] or interleaved by 8 rows [N / 8, 8 * row_bytes], which this kernel asks the GGML linear
    method to keep (`interleave`): its tiles then scale and accumulate 8 outputs per vector instruction."""
    return _qmatmul("q4_0", x, qweight, bias, out_f32)


# The GGML linear method keeps a layer's weight interleaved by this many rows for the kernel that carries it.
qmatmul_q4_0.interleave = INTERLEAVE  # type: ignore[attr-defined]


def qmatmul_q8_0(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 out_f32: bool = False) -> torch.Tensor:
    """``x @ dequant(W).T + b`` for q8_0 weights (x quantized to q8_0 per row, int8 dot products)."""
    return _qmatmul("q8_0", x, qweight, bias, out_f32)


def qmatmul_q4k(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
    """``x @ dequant(W).T + b`` for q4_K weights (x quantized to q8_K per row, int8 dot products). W canonical or
    interleaved by 8 rows, which this kernel asks for (as `qmatmul_q4_0`)."""
    return _qmatmul("q4k", x, qweight, bias, out_f32)


qmatmul_q4k.interleave = INTERLEAVE  # type: ignore[attr-defined]


def qmatmul_q5k(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
    """``x @ dequant(W).T + b`` for q5_K weights (x quantized to q8_K per row, int8 dot products). W canonical or
    interleaved by 8 rows, which this kernel asks for (as `qmatmul_q4_0`)."""
    return _qmatmul("q5k", x, qweight, bias, out_f32)


qmatmul_q5k.interleave = INTERLEAVE  # type: ignore[attr-defined]


def qmatmul_q6k(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
    """``x @ dequant(W).T + b`` for q6_K weights (x quantized to q8_K per row, int8 dot products)."""
    return _qmatmul("q6k", x, qweight, bias, out_f32)


def qmatmul_q4_0_vnni(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      out_f32: bool = False) -> torch.Tensor:
    """`qmatmul_q4_0` with the AVX-512 VNNI tiles (the reference on CPUs without them). W canonical or interleaved
    by 8 rows, which it asks for; on interleaved W the results are `qmatmul_q4_0`'s bit for bit."""
    return _qmatmul("q4_0", x, qweight, bias, out_f32, vnni=True)


qmatmul_q4_0_vnni.interleave = INTERLEAVE  # type: ignore[attr-defined]


def qmatmul_q8_0_vnni(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      out_f32: bool = False) -> torch.Tensor:
    """`qmatmul_q8_0` with the AVX-512 VNNI tiles (the reference on CPUs without them)."""
    return _qmatmul("q8_0", x, qweight, bias, out_f32, vnni=True)


def qmatmul_q4k_vnni(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     out_f32: bool = False) -> torch.Tensor:
    """`qmatmul_q4k` with the AVX-512 VNNI tiles (bit-identical to it; the reference on CPUs without them). W
    canonical or interleaved by 8 rows, which it asks for."""
    return _qmatmul("q4k", x, qweight, bias, out_f32, vnni=True)


qmatmul_q4k_vnni.interleave = INTERLEAVE  # type: ignore[attr-defined]


def qmatmul_q5k_vnni(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     out_f32: bool = False) -> torch.Tensor:
    """`qmatmul_q5k` with the AVX-512 VNNI tiles (bit-identical to it; the reference on CPUs without them). W
    canonical or interleaved by 8 rows, which it asks for."""
    return _qmatmul("q5k", x, qweight, bias, out_f32, vnni=True)


qmatmul_q5k_vnni.interleave = INTERLEAVE  # type: ignore[attr-defined]


def qmatmul_q6k_vnni(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     out_f32: bool = False) -> torch.Tensor:
    """`qmatmul_q6k` with the AVX-512 VNNI tiles (bit-identical to it; the reference on CPUs without them)."""
    return _qmatmul("q6k", x, qweight, bias, out_f32, vnni=True)


def ggml_interleave(qtype: str, qweight: torch.Tensor) -> torch.Tensor:
    """`quant.ggml.interleave.interleave` (the same bytes) in C++: canonical blocks [N, row bytes] -> interleaved by
    8 rows, 8-15x faster than the torch version (which seconds of a 7-8B model's load went to). What the kernel
    does not take goes to that reference."""
    qid = FORMATS[qtype][3] if qtype in INTERLEAVED else None
    if qid is not None and qweight.dtype is torch.uint8 and qweight.dim() == 2 and qweight.is_cpu \
            and qweight.shape[0] % INTERLEAVE == 0 and qweight.shape[1] % FORMATS[qtype][1] == 0 \
            and not qweight.requires_grad:
        ext = _native()
        if ext is not None:
            return ext.ggml_interleave(qweight, qid)
    return reference("ggml_interleave")(qtype, qweight)


def _affine(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, bits: int, pairs: int,
            out_f32: bool, vnni: bool) -> torch.Tensor:
    k = x.shape[-1] if x.dim() else 0
    if (
        bits in (4, 8)
        and pairs in (1, 2, 4)
        and k != 0
        and k % 32 == 0
        and _operands_take(x, packed, bias)
        and packed.shape[1] == -(-k // 128) * (16 * bits + 8 * pairs)
        and (not vnni or has_avx512_vnni())
    ):
        ext = _native()
        if ext is not None:
            if x.dim() == 2:
                return ext.qmatmul_affine(x, packed, bias, bits, pairs, vnni, out_f32)
            shape = x.shape
            y = ext.qmatmul_affine(x.reshape(-1, shape[-1]), packed, bias, bits, pairs, vnni, out_f32)
            return y.view(*shape[:-1], packed.shape[0])
    return reference("qmatmul_affine")(x, packed, bias, bits=bits, pairs=pairs, out_f32=out_f32)


def qmatmul_affine(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int,
                   pairs: int, out_f32: bool = False) -> torch.Tensor:
    """``x @ W.T + b`` for affine groups ``w = s * q + b`` (quant/affine/layout.py): x quantized to q8_0 per row,
    integer dot products of the codes, the offsets through the activations' block sums."""
    return _affine(x, packed, bias, bits, pairs, out_f32, vnni=False)


def qmatmul_affine_vnni(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int,
                        pairs: int, out_f32: bool = False) -> torch.Tensor:
    """`qmatmul_affine` with the AVX-512 VNNI tiles (the reference on CPUs without them)."""
    return _affine(x, packed, bias, bits, pairs, out_f32, vnni=True)


def _linear_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the bf16 linear kernel computes this call (cheap checks: this runs for every matmul)."""
    shape = x.shape
    if (
        not shape
        or x.dtype not in _X_DTYPES
        or weight.dtype is not torch.bfloat16
        or not x.is_cpu
        or not weight.is_cpu
        or x.requires_grad
        or weight.requires_grad
        or weight.dim() != 2
        or not weight.is_contiguous()
    ):
        return False
    k = shape[-1]
    if k == 0 or k % 16 or weight.shape[1] != k:
        return False
    if bias is not None and (
        not bias.is_cpu or bias.requires_grad or bias.dtype not in _X_DTYPES or bias.numel() != weight.shape[0]
    ):
        return False
    return not torch.compiler.is_compiling()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_f32: bool) -> torch.Tensor:
    # Same call depth as _qmatmul, so that the build warning points at the caller of the op.
    if _linear_takes(x, weight, bias):
        ext = _native()
        if ext is not None:
            if x.dim() == 2:
                return ext.linear_bf16(x, weight, bias, out_f32)
            shape = x.shape
            y = ext.linear_bf16(x.reshape(-1, shape[-1]), weight, bias, out_f32)
            return y.view(*shape[:-1], weight.shape[0])
    return torch_ops.linear_bf16(x, weight, bias, out_f32=out_f32)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_f32: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (float32 with `out_f32`) for bf16 weights on AVX2 CPUs: fp32 arithmetic,
    each row's result the same whatever else is in the batch. Anything else is the torch reference."""
    return _linear(x, weight, bias, out_f32)


def _block_scaled(op: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  block: tuple[int, int] | None, out_f32: bool, per_byte: int = 1,
                  table: torch.Tensor | None = None) -> torch.Tensor:
    """The widening linears with block scales (`linear_fp8`, `linear_int8`, `linear_lut4`): the checks the kernel
    needs, else the op's reference."""
    n = weight.shape[0] if weight.dim() == 2 else 0
    k = weight.shape[1] * per_byte if weight.dim() == 2 else 0
    bn, bk = block if block is not None else (max(n, 1), max(16, -(-k // 16) * 16))
    extra = () if table is None else (table,)
    if (
        k % 16 == 0
        and bk % 16 == 0
        and x.dim() > 0
        and x.shape[-1] == k
        and _operands_take(x, weight.view(torch.uint8), bias)
        and scale.numel() == -(-n // bn) * -(-k // bk)
        and not scale.requires_grad
    ):
        ext = _native()
        if ext is not None:
            fn = getattr(ext, op)
            s2 = scale.reshape(-(-n // bn), -(-k // bk))
            if x.dim() == 2:
                return fn(x, weight, *extra, s2, bn, bk, bias, out_f32)
            y = fn(x.reshape(-1, k), weight, *extra, s2, bn, bk, bias, out_f32)
            return y.view(*x.shape[:-1], n)
    return reference(op)(x, weight, *extra, scale, bias, block=block, out_f32=out_f32)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               block: tuple[int, int] | None = None, out_f32: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` for FP8 E4M3 weights (uint8 bit patterns [N, K]) with block scales: ``W[n, k] =
    e4m3(weight[n, k]) * scale[n // bn, k // bk]`` for `block` (bn, bk), or one scale for the tensor (`block`
    None). fp32 arithmetic (the weights widened in registers), batch-invariant; what the kernel does not take
    (other dtypes, K or bk not a multiple of 16, autograd) goes to the reference (the fp8 quantizer plugin's)."""
    return _block_scaled("linear_fp8", x, weight, scale, bias, block, out_f32)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                block: tuple[int, int] | None = None, out_f32: bool = False) -> torch.Tensor:
    """`linear_fp8` for int8 weights [N, K]: ``W[n, k] = weight[n, k] * scale[n // bn, k // bk]``."""
    return _block_scaled("linear_int8", x, weight, scale, bias, block, out_f32)


def linear_lut4(x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, block: tuple[int, int] | None = None,
                out_f32: bool = False) -> torch.Tensor:
    """`linear_fp8` for 4-bit codes looked up in a 16-value table (bitsandbytes NF4/FP4): packed uint8 [N, K / 2]
    (two codes per byte, the first in the high nibble), ``W[n, k] = table[code] * scale[n // bn, k // bk]``."""
    return _block_scaled("linear_lut4", x, packed, scale, bias, block, out_f32, per_byte=2, table=table)
