"""GGML block formats: quantize and dequantize rows, byte-compatible with llama.cpp.

A quantized row is a GGUF tensor row of that type: blocks laid out as llama.cpp's ``block_*``
structs (ggml-common.h), little-endian. Quantization follows llama.cpp's reference C code
(``quantize_row_*_ref`` in ggml-quants.c, no importance matrix) in float32, operation for
operation, so the bytes match; the k-quant searches live in `kquants`. With an importance vector
(an imatrix entry, ``quantize(name, w, importance=v)``) the types llama.cpp weights run its
``quantize_row_*_impl`` searches instead (`imatrix_quants`). Dequantization matches
llama.cpp's ``dequantize_row_*`` (and gguf-py's numpy version) bit for bit. The types we only
dequantize (GGUF files' i-quants, TQ1_0/TQ2_0, MXFP4: `DEQUANT_ONLY_FORMATS`) live in `iquants`.

Everything is vectorized torch on the CPU. Rows are processed a tile at a time (whole blocks,
a bounded number of elements) so the float32 temporaries stay within a few tens of MB whatever
the matrix size. The input is only read (it may be a read-only memory map) and may have any
float dtype and any strides.

    data = quantize("q4k", weight)          # uint8 [rows, row_bytes("q4k", cols)]
    data = quantize("q4k", weight, importance=imatrix_row)   # float32 [cols] >= 0
    w = dequantize("q4k", data, cols)       # float32 [rows, cols]
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import attrs
import torch

from . import imatrix_quants as IM
from . import iquants as IQ
from . import kquants as K


@attrs.frozen
class BlockFormat:
    """One GGML block type: `block_size` elements are stored in `type_size` bytes."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("q4_0", 2, 32, 18),
        BlockFormat("q4_1", 3, 32, 20),
        BlockFormat("q5_0", 6, 32, 22),
        BlockFormat("q5_1", 7, 32, 24),
        BlockFormat("q8_0", 8, 32, 34),
        BlockFormat("q8_1", 9, 32, 36),
        BlockFormat("q2k", 10, 256, 84),
        BlockFormat("q3k", 11, 256, 110),
        BlockFormat("q4k", 12, 256, 144),
        BlockFormat("q5k", 13, 256, 176),
        BlockFormat("q6k", 14, 256, 210),
        BlockFormat("q8k", 15, 256, 292),
    )
}


# Types we only dequantize (GGUF files): the i-quants, TQ1_0/TQ2_0 and MXFP4 (`iquants`).
DEQUANT_ONLY_FORMATS: dict[str, BlockFormat] = {
    name: BlockFormat(name, ggml_type, block_size, type_size)
    for name, (ggml_type, block_size, type_size) in IQ.IQ_TYPES.items()
}

# Every block format `dequantize` and `row_bytes` take: FORMATS (quantize too) and the dequantize-only ones.
ALL_FORMATS: dict[str, BlockFormat] = {**FORMATS, **DEQUANT_ONLY_FORMATS}


def _format(name: str) -> BlockFormat:
    try:
        return ALL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown GGML block format {name!r}; known: {', '.join(ALL_FORMATS)}") from None


def check_quantizable(name: str) -> None:
    """Raise a ValueError naming the type when `name` is a dequantize-only (or unknown) format."""
    if name in DEQUANT_ONLY_FORMATS:
        raise ValueError(f"GGML type {name} is dequantize-only: its blocks load as they are from GGUF files, "
                         f"but float weights cannot be quantized to it (quantizable types: {', '.join(FORMATS)})")
    _format(name)


def _check_cols(fmt: BlockFormat, cols: int) -> None:
    if cols <= 0 or cols % fmt.block_size:
        raise ValueError(f"{fmt.name} quantizes blocks of {fmt.block_size} values: a row of {cols} values "
                         f"is not a whole number of blocks")


def row_bytes(name: str, cols: int) -> int:
    """Bytes of one quantized row of `cols` values."""
    fmt = _format(name)
    _check_cols(fmt, cols)
    return cols // fmt.block_size * fmt.type_size


# ---------------------------------------------------------------------------- helpers


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float32 [N] -> uint8 [N, 2] (fp16, round to nearest even)."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16_at(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 at byte `off` of each block, as float32 [N, 1]."""
    return b[:, off:off + 2].contiguous().view(torch.float16).float()


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: round half away from zero, exactly (also just below .5, where floor(x + 0.5)
    is wrong); gguf-py's formulation. (torch.trunc is avoided: it is not vectorized on CPU.)"""
    a = v.abs()
    f = a.floor()
    f += (a.sub_(f).mul_(2.0)).floor_()
    return f.copysign_(v)


def _c_int(v: torch.Tensor) -> torch.Tensor:
    """C's float -> integer conversion as x86-64 does it (cvttss2si): truncation toward zero, and
    0x80000000 for NaN, infinities and values out of int32 range. int32."""
    ok = v.abs() < 2147483648.0  # NaN compares False
    return torch.where(ok, v, torch.full_like(v, -2147483648.0)).to(torch.int32)


def _c_int8(v: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """C's ``(int8_t)`` (or ``(uint8_t)``) of a float on x86-64: the low byte of `_c_int`, as int32."""
    lo, hi = (-128.0, 128.0) if signed else (0.0, 256.0)
    if v.numel() == 0 or bool((v.amin() > lo - 1) & (v.amax() < hi)):  # the usual case: in range, no NaN
        return v.to(torch.int32)
    b = _c_int(v) & 0xFF
    return ((b + 128) & 0xFF) - 128 if signed else b


def _first_absmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row, the first value of largest magnitude (+0.0 when all are 0), as [N, 1]."""
    ax = x.abs()
    idx = ax.argmax(1, keepdim=True)
    mx = x.gather(1, idx)
    return torch.where(ax.gather(1, idx) > 0, mx, torch.zeros_like(mx))


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, torch.full_like(d, 1.0).div_(d), torch.zeros_like(d))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Values j and j + 16 of a 32-block share byte j (low, high nibble): uint8 [N, 32] -> [N, 16]."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _qh_bytes(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of value j goes to bit j of a little-endian uint32: uint8 [N, 32] -> [N, 4]."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    out = bits[:, :, 0].clone()
    for k in range(1, 8):
        out |= bits[:, :, k] << k
    return out


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 16] -> int32 [N, 32]: low nibbles, then high nibbles."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0xF, q >> 4], 1)


def _qh_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 4] (a little-endian uint32) -> int32 [N, 32]: bit j is value j's bit 4, as 0/16."""
    bits = (qh.to(torch.int32)[:, :, None] >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1, 32) << 4


# ---------------------------------------------------------------------------- 32-blocks


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    mx = _first_absmax_rows(x)
    d = mx / -8.0
    q = _c_int8(x * _inv(d) + 8.5).clamp_(max=15) & 0xFF  # MIN(15, (int8_t)(x0 + 8.5f))
    qs = (q[:, :16] | (q[:, 16:] << 4)) & 0xFF
    return torch.cat([_fp16_bytes(d[:, 0]), qs.to(torch.uint8)], 1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    mn = x.amin(1, keepdim=True)
    mx = x.amax(1, keepdim=True)
    d = (mx - mn) / 15.0
    q = _c_int8((x - mn) * _inv(d) + 0.5).clamp_(max=15) & 0xFF
    qs = (q[:, :16] | (q[:, 16:] << 4)) & 0xFF
    return torch.cat([_fp16_bytes(d[:, 0]), _fp16_bytes(mn[:, 0]), qs.to(torch.uint8)], 1)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    mx = _first_absmax_rows(x)
    d = mx / -16.0
    q = (_c_int8(x * _inv(d) + 16.5).clamp_(max=31) & 0xFF).to(torch.uint8)
    return torch.cat([_fp16_bytes(d[:, 0]), _qh_bytes(q), _pack_nibbles(q)], 1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    mn = x.amin(1, keepdim=True)
    mx = x.amax(1, keepdim=True)
    d = (mx - mn) / 31.0
    q = _c_int8((x - mn) * _inv(d) + 0.5, signed=False).to(torch.uint8)  # (uint8_t)(x0 + 0.5f), no clamp in C
    return torch.cat([_fp16_bytes(d[:, 0]), _fp16_bytes(mn[:, 0]), _qh_bytes(q), _pack_nibbles(q)], 1)


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0/Q8_1's d [N, 1] and int8 values [N, 32] (``qs[j] = roundf(x[j]*id)``)."""
    d = x.abs().amax(1, keepdim=True) / 127.0
    return d, _c_int8(_roundf(x * _inv(d))).to(torch.int8)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _q8(x)
    return torch.cat([_fp16_bytes(d[:, 0]), q.view(torch.uint8)], 1)


def _q8_1(x: torch.Tensor) -> torch.Tensor:
    d, q = _q8(x)
    s = q.to(torch.int32).sum(1, keepdim=True).float() * d  # s = sum * d
    return torch.cat([_fp16_bytes(d[:, 0]), _fp16_bytes(s[:, 0]), q.view(torch.uint8)], 1)


def _dq4_0(b: torch.Tensor) -> torch.Tensor:
    return (_unpack_nibbles(b[:, 2:18]) - 8).float() * _fp16_at(b, 0)


def _dq4_1(b: torch.Tensor) -> torch.Tensor:
    return _unpack_nibbles(b[:, 4:20]).float() * _fp16_at(b, 0) + _fp16_at(b, 2)


def _dq5_0(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 6:22]) | _qh_bits(b[:, 2:6])
    return (q - 16).float() * _fp16_at(b, 0)


def _dq5_1(b: torch.Tensor) -> torch.Tensor:
    q = _unpack_nibbles(b[:, 8:24]) | _qh_bits(b[:, 4:8])
    return q.float() * _fp16_at(b, 0) + _fp16_at(b, 2)


def _dq8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].contiguous().view(torch.int8).float() * _fp16_at(b, 0)


def _dq8_1(b: torch.Tensor) -> torch.Tensor:
    return b[:, 4:36].contiguous().view(torch.int8).float() * _fp16_at(b, 0)


# ---------------------------------------------------------------------------- k-quant dequantization


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 64] -> int32 [N, 256]: value 128*h + 32*j + l is bits 2j..2j+1 of qs[32*h + l]."""
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32) >> (2 * torch.arange(4, dtype=torch.int32)).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 256)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: uint8 [N, 12] -> (sc, m) float32 [N, 8]."""
    s = s.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc.float(), m.float()


def _dq2_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    sc = b[:, 0:16].to(torch.int32)
    d, dmin = _fp16_at(b, 80), _fp16_at(b, 82)
    dl = d * (sc & 0xF).float()
    ml = dmin * (sc >> 4).float()
    q = _unpack_2bit(b[:, 16:80]).float().reshape(N, 16, 16)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(N, 256)


def _dq3_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    s = b[:, 96:108].to(torch.int32)
    low = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], 1)  # j < 8: low nibble of s[j]; else high of s[j-8]
    high = (s[:, 8:12][:, None, :] >> (2 * torch.arange(4, dtype=torch.int32))[None, :, None]) & 3  # [N, j/4, j%4]
    sc = (low | (high.reshape(N, 16) << 4)) - 32
    dl = _fp16_at(b, 108) * sc.float()
    q = _unpack_2bit(b[:, 32:96])
    hm = b[:, 0:32].to(torch.int32)  # bit (j / 32) of hmask[j % 32] set: no -4
    hbit = (hm[:, None, :] >> torch.arange(8, dtype=torch.int32)[None, :, None]) & 1  # [N, j/32, j%32]
    q = q - 4 * (1 - hbit.reshape(N, 256))
    return (dl[:, :, None] * q.float().reshape(N, 16, 16)).reshape(N, 256)


def _dq4_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    sc, m = _scale_min_k4(b[:, 4:16])
    d1 = _fp16_at(b, 0) * sc
    m1 = _fp16_at(b, 2) * m
    q = b[:, 16:144].to(torch.int32).reshape(N, 4, 1, 32) >> (4 * torch.arange(2, dtype=torch.int32)).reshape(1, 1, 2, 1)
    q = (q & 0xF).float().reshape(N, 8, 32)
    return (d1[:, :, None] * q - m1[:, :, None]).reshape(N, 256)


def _dq5_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    sc, m = _scale_min_k4(b[:, 4:16])
    d1 = _fp16_at(b, 0) * sc
    m1 = _fp16_at(b, 2) * m
    ql = b[:, 48:176].to(torch.int32).reshape(N, 4, 1, 32) >> (4 * torch.arange(2, dtype=torch.int32)).reshape(1, 1, 2, 1)
    ql = (ql & 0xF).reshape(N, 8, 32)
    qh = (b[:, 16:48].to(torch.int32)[:, None, :] >> torch.arange(8, dtype=torch.int32)[None, :, None]) & 1
    q = (ql + 16 * qh).float()
    return (d1[:, :, None] * q - m1[:, :, None]).reshape(N, 256)


def _dq6_k(b: torch.Tensor) -> torch.Tensor:
    N = b.shape[0]
    ql = b[:, 0:128].to(torch.int32).reshape(N, 2, 2, 32)  # [N, half, 0/32, l]
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)
    qh = b[:, 128:192].to(torch.int32).reshape(N, 2, 1, 32) >> (2 * torch.arange(4, dtype=torch.int32)).reshape(1, 1, 4, 1)
    q = ((low | ((qh & 3) << 4)) - 32).float().reshape(N, 16, 16)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = _fp16_at(b, 208) * sc
    return (dl[:, :, None] * q).reshape(N, 256)


def _dq8_k(b: torch.Tensor) -> torch.Tensor:
    d = b[:, 0:4].contiguous().view(torch.float32)
    return d * b[:, 4:260].contiguous().view(torch.int8).float()


# ---------------------------------------------------------------------------- entry points

_QUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0, "q8_1": _q8_1,
    "q2k": K.quantize_q2_k, "q3k": K.quantize_q3_k, "q4k": K.quantize_q4_k, "q5k": K.quantize_q5_k,
    "q6k": K.quantize_q6_k, "q8k": K.quantize_q8_k,
}
_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q4_0": _dq4_0, "q4_1": _dq4_1, "q5_0": _dq5_0, "q5_1": _dq5_1, "q8_0": _dq8_0, "q8_1": _dq8_1,
    "q2k": _dq2_k, "q3k": _dq3_k, "q4k": _dq4_k, "q5k": _dq5_k, "q6k": _dq6_k, "q8k": _dq8_k,
    **IQ.DEQUANTIZE,
}

# Values per tile: bounds the temporaries (measured peak, all workers together: under ~64 MB).
# The k-quant searches hold ~10-20 float32 copies of a tile (q6k: one per search step), and
# larger tiles amortize their thousands of small per-element-position ops.
_QUANT_TILE = {"q2k": 1 << 18, "q3k": 1 << 18, "q4k": 1 << 18, "q5k": 1 << 18, "q6k": 1 << 17, "q8k": 1 << 19}
_DEFAULT_QUANT_TILE = 1 << 19
# With an importance vector: make_qx_quants (q4_0, q5_0, q3k, q6k) holds 19 copies of a tile.
_IMATRIX_TILE = {"q4_0": 1 << 17, "q5_0": 1 << 17, "q4_1": 1 << 17, "q5_1": 1 << 17, "q2k": 1 << 18,
                 "q3k": 1 << 17, "q4k": 1 << 18, "q5k": 1 << 18, "q6k": 1 << 17}
_DEQUANT_TILE = 1 << 19


def _tiles(rows: int, cols: int, block: int, tile: int):
    """(r0, r1, c0, c1) tiles of whole blocks holding about `tile` values each."""
    blocks_per_tile = max(1, tile // block)
    blocks_per_row = cols // block
    if blocks_per_row <= blocks_per_tile:
        step = max(1, blocks_per_tile // blocks_per_row)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step), 0, cols
    else:
        width = blocks_per_tile * block
        for r0 in range(rows):
            for c0 in range(0, cols, width):
                yield r0, r0 + 1, c0, min(cols, c0 + width)


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def _tile_threads() -> Iterator[int]:
    """Run with torch's intra-op parallelism off and yield the thread count it had, for our own
    tile-parallel workers. The quantizers issue thousands of small and mid-sized ops; an OpenMP
    parallel region per op costs a scheduler time slice whenever another process holds a core
    (10-50x slower on a busy 2-core machine), while whole tiles on worker threads just share the
    cores. The setting is process-wide; concurrent callers share one save/restore."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != 1:
                torch.set_num_threads(1)
        _threads_users += 1
        n = _threads_saved
    try:
        yield n
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved != 1:
                torch.set_num_threads(_threads_saved)


def _run_tiles(tiles: list, work: Callable[[tuple], None]) -> None:
    # Inference mode is per thread: the workers take the caller's, or writing into an output made
    # under the engine's inference_mode would be refused.
    inference = torch.is_inference_mode_enabled()

    def run(tile: tuple) -> None:
        with torch.inference_mode(inference):
            work(tile)

    with _tile_threads() as n:
        if n > 1 and len(tiles) > 1:
            with ThreadPoolExecutor(min(n, len(tiles)), thread_name_prefix="ggml-quant") as pool:
                for _ in pool.map(run, tiles):
                    pass
        else:
            for t in tiles:
                work(t)


def _check_importance(name: str, importance: torch.Tensor, cols: int) -> torch.Tensor:
    """The importance vector as float32 [cols] on the CPU, or a ValueError naming what is wrong."""
    if not isinstance(importance, torch.Tensor) or importance.dim() != 1 or importance.shape[0] != cols \
            or not (importance.is_floating_point() or importance.dtype in (torch.int32, torch.int64)):
        shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(f"{name}: the importance vector must be a float tensor [{cols}] (one value per "
                         f"input column), got {shape}")
    imp = importance.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError(f"{name}: the importance vector must be finite and >= 0 (mean squared activations)")
    return imp


def quantize(name: str, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize `weight` ``[rows, cols]`` (any float dtype, any strides; only read) to GGML type
    `name`: ``uint8 [rows, row_bytes(name, cols)]``, each row a valid GGUF tensor row. Leading
    dimensions beyond two are kept (``[..., cols]`` -> ``[..., row_bytes]``). Computed on the CPU
    (on up to ``torch.get_num_threads()`` worker threads, see `_tile_threads`); the result is put
    on `weight`'s device.

    `importance`: an importance matrix entry, float ``[cols]`` >= 0 (llama.cpp's imatrix: the mean
    squared activation of each input column). Given, the types llama.cpp quantizes with
    ``quant_weights`` (q2k..q6k, q4_0, q4_1, q5_0, q5_1) run its weighted searches
    (``quantize_row_*_impl``, `imatrix_quants`): value j of every row is weighted by
    ``importance[j]``. q8_0, q8_1 and q8k ignore it, as llama.cpp does. None: the reference
    quantizers, unchanged."""
    check_quantizable(name)
    fmt = _format(name)
    if weight.dim() < 1 or not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor [rows, cols], got {weight.dtype} {tuple(weight.shape)}")
    cols = weight.shape[-1]
    _check_cols(fmt, cols)
    lead = tuple(weight.shape[:-1])
    w2 = weight.detach().reshape(-1, cols) if weight.dim() != 2 else weight.detach()
    if w2.device.type != "cpu":
        w2 = w2.cpu()
    rows = w2.shape[0]
    bs, ts = fmt.block_size, fmt.type_size
    out = torch.empty(rows, cols // bs * ts, dtype=torch.uint8)
    imp = None if importance is None else _check_importance(name, importance, cols)
    if imp is not None and name in IM.WEIGHTED_TYPES:
        with torch.no_grad():
            _quantize_weighted(name, w2, imp, out)
        return out.reshape(*lead, -1).to(weight.device)
    fn = _QUANTIZE[name]

    def work(tile: tuple) -> None:
        r0, r1, c0, c1 = tile
        x = w2[r0:r1, c0:c1].to(torch.float32).reshape(-1, bs)
        out[r0:r1, c0 // bs * ts:c1 // bs * ts] = fn(x).reshape(r1 - r0, -1)

    with torch.no_grad():
        _run_tiles(list(_tiles(rows, cols, bs, _QUANT_TILE.get(name, _DEFAULT_QUANT_TILE))), work)
    return out.reshape(*lead, -1).to(weight.device)


def _quantize_weighted(name: str, w2: torch.Tensor, imp: torch.Tensor, out: torch.Tensor) -> None:
    """`quantize` with an importance vector (float32 [cols]) for a type of `IM.WEIGHTED_TYPES`."""
    fmt = _format(name)
    rows, cols = w2.shape
    bs, ts = fmt.block_size, fmt.type_size
    # The 32-block types weight by the whole row's mean square (~0.15 s per 16M values, one thread).
    sigma2 = IM.row_sigma2(w2) if name in IM.ROW_SIGMA2 else None

    def work(tile: tuple) -> None:
        r0, r1, c0, c1 = tile
        x = w2[r0:r1, c0:c1].to(torch.float32).reshape(-1, bs)
        qw = imp[c0:c1].expand(r1 - r0, c1 - c0).reshape(-1, bs)
        if sigma2 is None:
            b = IM.SUPERBLOCK[name](x, qw)
        else:
            s2 = sigma2[r0:r1, None].expand(r1 - r0, (c1 - c0) // bs).reshape(-1, 1)
            b = IM.ROW_SIGMA2[name](x, qw, s2)
        out[r0:r1, c0 // bs * ts:c1 // bs * ts] = b.reshape(r1 - r0, -1)

    _run_tiles(list(_tiles(rows, cols, bs, _IMATRIX_TILE[name])), work)


def dequantize(name: str, data: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize ``uint8 [rows, row_bytes(name, cols)]`` (leading dimensions kept) to ``[rows, cols]``
    of `dtype`, exactly as llama.cpp's ``dequantize_row_*`` (computed in float32 on the CPU, then
    cast and put on `data`'s device)."""
    fmt = _format(name)
    nbytes = row_bytes(name, cols)
    if data.dtype != torch.uint8 or data.dim() < 1 or data.shape[-1] != nbytes:
        raise ValueError(f"{name}: expected uint8 [..., {nbytes}] for rows of {cols} values, "
                         f"got {data.dtype} {tuple(data.shape)}")
    lead = tuple(data.shape[:-1])
    d2 = data.reshape(-1, nbytes)
    if d2.device.type != "cpu":
        d2 = d2.cpu()
    rows = d2.shape[0]
    bs, ts = fmt.block_size, fmt.type_size
    out = torch.empty(rows, cols, dtype=dtype)
    fn = _DEQUANTIZE[name]

    def work(tile: tuple) -> None:
        r0, r1, c0, c1 = tile
        b = d2[r0:r1, c0 // bs * ts:c1 // bs * ts].reshape(-1, ts)
        out[r0:r1, c0:c1] = fn(b).reshape(r1 - r0, c1 - c0)

    _run_tiles(list(_tiles(rows, cols, bs, _DEQUANT_TILE)), work)
    return out.reshape(*lead, cols).to(data.device)
