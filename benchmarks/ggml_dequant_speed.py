"""GGML dequantize throughput: every block type's torch dequantizer on a 2048x2048 matrix.

The dequantize-only GGUF types (i-quants, TQ1_0/TQ2_0, MXFP4) run through the reference path:
dequantize the whole weight, then an fp32 matmul, on every call. This prints, per type, the
dequantize time of one 2048x2048 weight (random valid blocks), millions of values per second,
and the time of one reference ``qmatmul_<type>`` call with one activation row (decode). The
types are timed in alternating passes, so machine noise hits all alike; the median pass and the
best are reported.

    python benchmarks/ggml_dequant_speed.py [--threads 2] [--passes 7] [--types iq2_xxs,q4k]
        [--out benchmarks/results/ggml_dequant_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def random_blocks(torch, fmt, rows: int, cols: int, generator):
    """Random block bytes with the fp16 scale fields finite (uint8 [rows, row_bytes])."""
    nblocks = rows * cols // fmt.block_size
    b = torch.randint(0, 256, (nblocks, fmt.type_size), dtype=torch.uint8, generator=generator)
    fp16 = {"iq1_m": None, "mxfp4": None, "tq1_0": 52, "tq2_0": 64, "q2k": 80, "q3k": 108, "q6k": 208,
            "q8k": None}.get(fmt.name, 0)
    if fp16 is not None:
        d = (torch.randn(nblocks, generator=generator) * 0.01).half().view(torch.uint8).reshape(-1, 2)
        b[:, fp16:fp16 + 2] = d
    if fmt.name == "iq1_m":  # the fp16 d sits in the top nibbles of the 4 uint16 scale words
        d = (torch.randn(nblocks, generator=generator) * 0.01).half().view(torch.int16).to(torch.int32) & 0xFFFF
        for j in range(4):
            hi = 49 + 2 * j
            b[:, hi] = ((b[:, hi].to(torch.int32) & 0x0F) | (((d >> (4 * j)) & 0xF) << 4)).to(torch.uint8)
    if fmt.name == "q8k":
        b[:, 0:4] = (torch.randn(nblocks, generator=generator) * 0.01).view(torch.uint8).reshape(-1, 4)
    return b.reshape(rows, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--types", default=None, help="comma-separated (default: every GGML type)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from mistralrs_plugins.quant.ggml import reference
    from mistralrs_plugins.quant.ggml.formats import ALL_FORMATS, DEQUANT_ONLY_FORMATS, dequantize

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.types.split(",") if args.types else list(ALL_FORMATS)
    g = torch.Generator().manual_seed(0)
    data = {n: random_blocks(torch, ALL_FORMATS[n], args.rows, args.cols, g) for n in names}
    x = torch.randn(1, args.cols, generator=g)
    times: dict[str, list[float]] = {n: [] for n in names}
    mm: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up (tables, thread pools)
            dequantize(n, data[n], args.cols)
        for _ in range(args.passes):
            for n in names:
                t = time.perf_counter()
                dequantize(n, data[n], args.cols)
                times[n].append(time.perf_counter() - t)
                fn = getattr(reference, f"qmatmul_{n}")
                t = time.perf_counter()
                fn(x, data[n])
                mm[n].append(time.perf_counter() - t)
    values = args.rows * args.cols
    results = {}
    print(f"{args.rows}x{args.cols}, {torch.get_num_threads()} torch threads, {args.passes} alternating passes")
    print(f"{'type':8s} {'median ms':>10s} {'best ms':>8s} {'Mvalues/s':>10s} {'GB/s in':>8s} {'qmatmul M=1 ms':>15s}")
    for n in names:
        med, best = statistics.median(times[n]), min(times[n])
        nbytes = data[n].numel()
        results[n] = {"dequant_only": n in DEQUANT_ONLY_FORMATS, "median_ms": med * 1e3, "best_ms": best * 1e3,
                      "mvalues_per_s": values / med / 1e6, "block_gb_per_s": nbytes / med / 1e9,
                      "qmatmul_m1_median_ms": statistics.median(mm[n]) * 1e3}
        r = results[n]
        print(f"{n:8s} {r['median_ms']:10.1f} {r['best_ms']:8.1f} {r['mvalues_per_s']:10.0f} "
              f"{r['block_gb_per_s']:8.2f} {r['qmatmul_m1_median_ms']:15.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "rows": args.rows, "cols": args.cols, "threads": torch.get_num_threads(), "passes": args.passes,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "results": results}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
