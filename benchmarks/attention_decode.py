"""Decode attention over the paged KV cache: the native `paged_attention_decode` kernel vs the torch
reference (gathered blocks, one grouped-query SDPA call), on Llama-3.2-1B's attention shape
(32 query heads, 8 KV heads, head dim 64, bf16, block size 32).

For 1 and 16 sequences and context lengths from 32 to 2048 tokens, reports the time per layer call
and the achieved K/V read bandwidth (K/V bytes visible to the queries / time). Each sequence's
blocks are scattered through a pool large enough that long contexts come from DRAM, as in serving.
The two implementations are timed in alternating passes; the median pass is reported.

    python benchmarks/attention_decode.py [--threads 2] [--out benchmarks/results/attention_decode.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HQ, HK, D, BLOCK = 32, 8, 64, 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="32,256,1024,2048")
    ap.add_argument("--seqs", default="1,16")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--kernel", choices=("auto", "avx512", "avx2"), default="auto",
                    help="the AVX-512 library, or the AVX2 one (auto: the one this CPU registers)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/attention_decode[_avx2].json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mistralrs.nn import torch_ops
    from mistralrs_plugins.kernels.cpu_native import has_avx512_bf16, ops

    kernel = args.kernel if args.kernel != "auto" else ("avx512" if has_avx512_bf16() else "avx2")
    native = ops.paged_attention_decode if kernel == "avx512" else ops.paged_attention_decode_avx2
    if (ops.extension() if kernel == "avx512" else ops._native_avx2()) is None:
        print(f"the {kernel} kernels are unavailable on this machine", file=sys.stderr)
        return 1
    out_path = args.out or f"benchmarks/results/attention_decode{'_avx2' if kernel == 'avx2' else ''}.json"
    contexts = [int(c) for c in args.contexts.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    blocks = max(seqs) * (-(-max(contexts) // BLOCK)) + 8
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(blocks * BLOCK, HK, D, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(blocks * BLOCK, HK, D, generator=g).to(torch.bfloat16)
    impls = {"native": native, "torch": torch_ops.paged_attention_decode}
    rows = []
    for s in seqs:
        for ctx in contexts:
            width = -(-ctx // BLOCK)
            tables = torch.randperm(blocks, generator=g)[: s * width].view(s, width)
            lens = torch.full((s,), ctx)
            q = torch.randn(s, HQ, D, generator=g).to(torch.bfloat16)
            times: dict[str, list[float]] = {name: [] for name in impls}
            reps = max(1, int(4e8 // (s * ctx * HK * D * 4)))
            for _ in range(args.passes):
                for name, fn in impls.items():
                    fn(q, k_cache, v_cache, tables, lens, BLOCK, D**-0.5)
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn(q, k_cache, v_cache, tables, lens, BLOCK, D**-0.5)
                    times[name].append((time.perf_counter() - t) / reps)
            kv_bytes = s * ctx * HK * D * 2 * 2
            row = {"seqs": s, "context": ctx, "kv_bytes": kv_bytes}
            for name in impls:
                sec = statistics.median(times[name])
                row[f"{name}_us"] = sec * 1e6
                row[f"{name}_gb_per_s"] = kv_bytes / sec / 1e9
            row["speedup"] = row["torch_us"] / row["native_us"]
            rows.append(row)
            print(f"seqs {s:3d} context {ctx:5d}   native {row['native_us']:9.0f} us {row['native_gb_per_s']:6.1f} GB/s"
                  f"   torch {row['torch_us']:9.0f} us {row['torch_gb_per_s']:6.1f} GB/s   {row['speedup']:5.1f}x")
    out = {"shape": {"query_heads": HQ, "kv_heads": HK, "head_dim": D, "block_size": BLOCK, "dtype": "bfloat16"},
           "kernel": kernel, "threads": args.threads, "results": rows}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
