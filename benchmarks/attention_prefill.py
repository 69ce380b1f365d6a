"""Prefill attention over the paged KV cache on CPU: the native `paged_attention_prefill` kernel (each new
token a row of the decode kernel) vs the fp32 query-block path the paged backend used before it
(`SdpaBackend`'s per-sequence attention: gathered K/V, one bmm for the scores and one for the values per
block of query rows), on Llama-3.2-1B's attention shape (32 query heads, 8 KV heads, head dim 64, bf16,
block size 32).

For a fresh prompt of each length, and a chunk over cached context, reports the time per layer call and
the attention FLOPs per second (causal: 4 * Hq * D per visible (query, key) pair). The two are timed in
alternating passes; the median pass is reported.

    python benchmarks/attention_prefill.py [--threads 2] [--out benchmarks/results/attention_prefill.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HQ, HK, D, BLOCK = 32, 8, 64, 32


def bench_case(new: int, ctx: int, g, passes: int, kernel: str = "avx512") -> dict:  # type: ignore[no-untyped-def]
    """One prompt chunk of `new` tokens over `ctx` cached ones: both paths timed, the row of the results."""
    import torch

    from mistralrs_plugins.attention.sdpa.backend import _allowed, _blocked_attention
    from mistralrs_plugins.kernels.cpu_native import ops

    scale = D**-0.5
    length = ctx + new
    width = -(-length // BLOCK)
    blocks = width + 8
    k_cache = torch.randn(blocks * BLOCK, HK, D, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(blocks * BLOCK, HK, D, generator=g).to(torch.bfloat16)
    tables = torch.randperm(blocks, generator=g)[:width].view(1, width)
    q = torch.randn(new, HQ, D, generator=g).to(torch.bfloat16)

    prefill = ops.paged_attention_prefill if kernel == "avx512" else ops.paged_attention_prefill_avx2

    def native() -> torch.Tensor:
        return prefill(q, k_cache, v_cache, tables, [length], [0, new], BLOCK, scale)

    def query_blocks() -> torch.Tensor:
        pos = torch.arange(length)
        slots = tables[0, pos // BLOCK] * BLOCK + pos % BLOCK
        keys, vals = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)
        allowed = _allowed(torch.arange(ctx, length)[:, None], pos[None, :], True, None)
        out = _blocked_attention(q.transpose(0, 1), keys, vals, allowed, lambda r: ctx + r, scale)
        return out.transpose(0, 1).to(q.dtype)

    impls = {"native": native, "query_blocks": query_blocks}
    err = (native().float() - query_blocks().float()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(passes):
        for name, fn in impls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    pairs = sum(ctx + i + 1 for i in range(new))  # visible (query, key) pairs, causal
    flops = 4 * HQ * D * pairs
    row: dict = {"new_tokens": new, "context": ctx, "max_abs_diff": err}
    for name in impls:
        sec = statistics.median(times[name])
        row[f"{name}_ms"] = sec * 1e3
        row[f"{name}_gflop_per_s"] = flops / sec / 1e9
    row["speedup"] = row["query_blocks_ms"] / row["native_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="128:0,512:0,2048:0,256:1024",
                    help="comma-separated NEW:CONTEXT (new tokens over cached context)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--kernel", choices=("auto", "avx512", "avx2"), default="auto",
                    help="the AVX-512 library, or the AVX2 one (auto: the one this CPU registers)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/attention_prefill[_avx2].json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mistralrs_plugins.kernels.cpu_native import has_avx512_bf16, ops

    kernel = args.kernel if args.kernel != "auto" else ("avx512" if has_avx512_bf16() else "avx2")
    if (ops.extension() if kernel == "avx512" else ops._native_avx2()) is None:
        print(f"the {kernel} kernels are unavailable on this machine", file=sys.stderr)
        return 1
    out_path = args.out or f"benchmarks/results/attention_prefill{'_avx2' if kernel == 'avx2' else ''}.json"
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for new, ctx in cases:
        row = bench_case(new, ctx, g, args.passes, kernel)
        rows.append(row)
        print(f"new {new:5d} context {ctx:5d}   native {row['native_ms']:8.2f} ms {row['native_gflop_per_s']:6.1f} "
              f"GFLOP/s   query blocks {row['query_blocks_ms']:8.2f} ms {row['query_blocks_gflop_per_s']:6.1f} "
              f"GFLOP/s   {row['speedup']:4.2f}x   (max |diff| {row['max_abs_diff']:.2g})")
    out = {"shape": {"query_heads": HQ, "kv_heads": HK, "head_dim": D, "block_size": BLOCK, "dtype": "bfloat16"},
           "kernel": kernel, "threads": args.threads, "results": rows}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
