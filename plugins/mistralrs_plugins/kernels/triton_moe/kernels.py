"""Triton ``moe_experts(x[T, H], topk_weights[T, k], topk_ids[T, k], w13[E, 2I, H], w2[E, H, I]) -> [T, H]``
(the op `mistralrs.nn.torch_ops.moe_experts`).

1. `align`: the T * k (token, slot) pairs sorted by expert (stable), each expert's run padded to a multiple of
   ``BLOCK_M`` with a sentinel, and the expert of each block of ``BLOCK_M`` (-1 for blocks past the end).
   All on the device, no sync: the number of blocks is bounded by ``ceil(T * k / BLOCK_M) + E``.
2. `_moe_gemm`, grid (blocks, output tiles): a block's rows are pairs of one expert; the first projection
   gathers their tokens' rows of x (``pair // k``) and multiplies by the expert's ``w13`` ([2I, H]); the second
   takes the pairs' rows of the activation and the expert's ``w2``. Each writes its pairs' rows, rounded to x's
   dtype (as each expert's ``F.linear`` does). Blocks without an expert run no K loop.
3. Between them ``silu_and_mul``; after them ``h * topk_weights`` and the k products of each token added in
   increasing expert order, in x's dtype: the reference's ``index_add_`` sequence, so the result is the
   reference's up to the matmuls' summation order.

Dots: the weights' dtype with fp32 accumulation on a GPU (bf16/fp16 products are exact in fp32); fp32 inputs,
and everything under the interpreter (whose bf16 ``tl.dot`` is wrong), use fp32 dots.

``moe_experts_ggml`` (its reference: the GGML quantizer plugin's `reference.moe_experts_ggml`): the same with experts of GGML blocks (GGUF, UQFF,
``--isq q4k``...: each expert's rows of llama.cpp's block bytes, stacked): the grouped GEMMs load each weight
tile as bytes and dequantize it in registers (`triton_ggml.dequant_tile`, the formats of `triton_quant`),
with fp32 dots as `triton_quant`'s matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs.nn import torch_ops
from mistralrs.nn.kernels import lookup_reference
from mistralrs_plugins.kernels.triton_ggml import FORMATS, dequant_tile
from mistralrs_plugins.kernels.triton_support import interpreter_mode, runs_here

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pairs int32 [blocks * block_m] (T * k: padding), expert of each block int32 [blocks] (-1: none))."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    order = torch.argsort(flat, stable=True)
    # not bincount: it reads the largest id back to size its output (a host sync, which a CUDA graph refuses)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    cstart = torch.cumsum(counts, 0) - counts
    e_sorted = flat[order]
    dest = (pend - padded)[e_sorted] + torch.arange(n, device=dev) - cstart[e_sorted]
    blocks = triton.cdiv(n, block_m) + num_experts
    pairs = torch.full((blocks * block_m,), n, dtype=torch.int32, device=dev)
    pairs[dest] = order.to(torch.int32)
    expert = torch.searchsorted(pend, torch.arange(blocks, device=dev) * block_m, right=True)
    expert = torch.where(expert < num_experts, expert, -1).to(torch.int32)
    return pairs, expert


@triton.jit
def _moe_gemm(a_ptr, w_ptr, out_ptr, pairs_ptr, expert_ptr, n_pairs, N, K, top_k, a_sm, w_se, w_sn, o_sm,
              GATHER: tl.constexpr, FP32: tl.constexpr, FMT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    e = tl.load(expert_ptr + b)
    pairs = tl.load(pairs_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    pm = pairs < tl.where(e >= 0, n_pairs, 0)  # no rows in blocks without an expert
    if GATHER:
        arows = pairs // top_k
    else:
        arows = pairs
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    w_rows = w_ptr + tl.maximum(e, 0).to(tl.int64) * w_se + rn[:, None].to(tl.int64) * w_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_end = tl.where(e >= 0, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        a = tl.load(a_ptr + arows[:, None].to(tl.int64) * a_sm + kk[None, :], mask=pm[:, None] & km[None, :],
                    other=0.0)
        if FMT >= 0:  # GGML blocks (w: bytes), dequantized in registers: fp32 dots, as triton_quant's
            w = dequant_tile(w_rows, kk, nm[:, None] & km[None, :], FMT)
            acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif FP32:
            w = tl.load(w_rows + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            w = tl.load(w_rows + kk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(w))
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * o_sm + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=pm[:, None] & nm[None, :])


def _grouped(a: torch.Tensor, w: torch.Tensor, pairs: torch.Tensor, expert: torch.Tensor, n_pairs: int,
             top_k: int, gather: bool, fmt: int = -1) -> torch.Tensor:
    N, K = w.shape[1], a.shape[1]
    out = torch.empty((n_pairs, N), dtype=a.dtype, device=a.device)
    _moe_gemm[(expert.shape[0], triton.cdiv(N, BLOCK_N))](
        a, w, out, pairs, expert, n_pairs, N, K, top_k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATHER=gather, FP32=a.dtype == torch.float32 or interpreter_mode(), FMT=fmt,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """The reference's signature (`torch_ops.moe_experts`)."""
    if (not runs_here(x, topk_weights, topk_ids, w13, w2) or x.dim() != 2 or x.dtype not in DTYPES
            or w13.dtype != x.dtype or w2.dtype != x.dtype or w13.dim() != 3 or w2.dim() != 3
            or w13.shape[2] != x.shape[1] or w2.shape[1] != x.shape[1] or w13.shape[1] != 2 * w2.shape[2]
            or w13.shape[0] != w2.shape[0] or w13.stride(-1) != 1 or w2.stride(-1) != 1
            or topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]):
        return torch_ops.moe_experts(x, topk_weights, topk_ids, w13, w2)
    return _experts(x, topk_weights, topk_ids, w13, w2)


def moe_experts_ggml(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor, qtype: str) -> torch.Tensor:
    """The reference's signature (the GGML quantizer plugin's `reference.moe_experts_ggml`): the same sort and grouped GEMMs over GGML
    block bytes, each weight tile dequantized in registers (`triton_ggml.dequant_tile`)."""
    fmt, elems, nbytes = FORMATS.get(qtype, (-1, 1, 0))
    H = x.shape[-1] if x.dim() == 2 else -1
    inter = w13.shape[1] // 2 if w13.dim() == 3 else -1
    if (fmt < 0 or not runs_here(x, topk_weights, topk_ids, w13, w2) or x.dim() != 2 or x.dtype not in DTYPES
            or w13.dtype != torch.uint8 or w2.dtype != torch.uint8 or w13.dim() != 3 or w2.dim() != 3
            or H % elems or inter % elems or w13.shape[2] != H // elems * nbytes or w2.shape[1] != H
            or w2.shape[2] != inter // elems * nbytes or w13.shape[0] != w2.shape[0]
            or w13.stride(-1) != 1 or w2.stride(-1) != 1
            or topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]):
        return lookup_reference("moe_experts_ggml")(x, topk_weights, topk_ids, w13, w2, qtype)
    return _experts(x, topk_weights, topk_ids, w13, w2, fmt)


def _experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, fmt: int = -1) -> torch.Tensor:
    T, k = topk_ids.shape
    if T == 0 or k == 0:
        return torch.zeros_like(x)
    xc = x if x.stride(-1) == 1 else x.contiguous()
    pairs, expert = align(topk_ids, w13.shape[0])
    h = _grouped(xc, w13, pairs, expert, T * k, k, gather=True, fmt=fmt)  # [T * k, 2I], pair p = token p // k
    h = _grouped(torch_ops.silu_and_mul(h), w2, pairs, expert, T * k, k, gather=False, fmt=fmt)  # [T * k, H]
    y = (h.view(T, k, -1) * topk_weights[..., None]).to(x.dtype)
    order = torch.argsort(topk_ids, dim=1, stable=True)  # each token's experts in increasing id
    y = y.gather(1, order[..., None].expand_as(y))
    out = y[:, 0].clone()
    for j in range(1, k):  # same expert id twice: the reference adds both (torch.where finds both)
        out += y[:, j]
    return out
