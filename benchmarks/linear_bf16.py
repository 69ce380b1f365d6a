"""bf16 decode GEMV/GEMM bandwidth and prefill GFLOP/s: a native `linear_bf16` kernel vs torch's F.linear.

The kernel is cpu_native's AVX-512-BF16 one where the CPU has avx512_bf16, else cpu_quant's AVX2/FMA one
(``--kernel avx512|avx2`` to choose).

For each weight matrix of Llama-3.2-1B (2048x2048 q/o, 512x2048 k/v, 8192x2048 gate/up, 2048x8192
down, 128256x2048 tied lm_head) and M = 1, 4, 8, 16 and 32 rows (batch-1 decode up to 32 concurrent
decode requests), reports the achieved weight-read bandwidth (weight bytes / time per call). Enough
copies of each weight are cycled through that every call reads its weights from DRAM, as in decode,
not from the last-level cache. The two implementations are timed in alternating passes so machine
noise hits both alike; the median pass is reported. A float32 ``sum`` over 1 GiB gives the host's
plain read bandwidth for comparison. Then prefill: ``--prefill-rows`` (512) rows against the
gate/up, down and q/o matrices, in GFLOP/s (2 M N K / time), the same alternating passes.

    python benchmarks/linear_bf16.py [--kernel auto] [--threads 2] [--rows 1,4,8,16,32] [--prefill-rows 512]
        [--out benchmarks/results/linear_bf16.json (linear_bf16_avx2.json for the AVX2 kernel)]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = [  # (name, N = out features, K = in features)
    ("q_proj/o_proj", 2048, 2048),
    ("k_proj/v_proj", 512, 2048),
    ("gate_proj/up_proj", 8192, 2048),
    ("down_proj", 2048, 8192),
    ("lm_head (tied)", 128256, 2048),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8,16,32", help="comma-separated M values")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--min-bytes", type=float, default=384e6, help="weight bytes cycled per pass (> LLC)")
    ap.add_argument("--kernel", choices=("auto", "avx512", "avx2"), default="auto")
    ap.add_argument("--prefill-rows", type=int, default=512, help="M of the prefill measurement (0: skip)")
    ap.add_argument("--prefill-passes", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mistralrs_plugins.kernels import cpu_native, cpu_quant

    kernel = args.kernel
    if kernel == "auto":
        kernel = "avx512" if cpu_native.has_avx512_bf16() else "avx2"
    if kernel == "avx512":
        from mistralrs_plugins.kernels.cpu_native import ops

        if not cpu_native.has_avx512_bf16():
            print("this CPU has no avx512_bf16: the AVX-512 kernel does not run here")
            return 1
    else:
        from mistralrs_plugins.kernels.cpu_quant import ops

        if not cpu_quant.has_avx2():
            print("this CPU has no avx2/fma/f16c: the AVX2 kernel does not run here")
            return 1
    out_path = args.out or ("benchmarks/results/linear_bf16.json" if kernel == "avx512"
                            else "benchmarks/results/linear_bf16_avx2.json")
    print(f"kernel: {kernel}")
    t = time.perf_counter()
    if ops.extension() is None:
        print(f"native kernel unavailable: {ops.status()['failed']}")
        return 1
    print(f"native kernel ready in {time.perf_counter() - t:.1f} s (build or cache load)")

    big = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    big.sum()
    reads = []
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        reads.append(big.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del big
    read_gbs = statistics.median(reads)
    print(f"host read bandwidth (fp32 sum over 1 GiB, {args.threads} threads): {read_gbs:.1f} GB/s")

    impls = {"native": ops.linear_bf16, "torch": F.linear}
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'matrix':20}{'N x K':>14}{'M':>3}{'native ms':>11}{'torch ms':>10}{'native GB/s':>13}{'torch GB/s':>12}"
          f"{'speedup':>9}{'max err':>10}")
    g = torch.Generator().manual_seed(0)
    for name, n, k in SHAPES:
        nbytes = n * k * 2
        copies = max(1, math.ceil(args.min_bytes / nbytes))
        weights = [(torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16) for _ in range(copies)]
        for m in rows_list:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            err = (impls["native"](x, weights[0]).float() - ref).abs().max().item()
            times: dict[str, list[float]] = {key: [] for key in impls}
            with torch.inference_mode():
                for fn in impls.values():  # warm-up pass
                    for w in weights:
                        fn(x, w)
                for _ in range(args.passes):
                    for key, fn in impls.items():
                        t = time.perf_counter()
                        for w in weights:
                            fn(x, w)
                        times[key].append((time.perf_counter() - t) / copies)
            gbs = {key: nbytes / statistics.median(v) / 1e9 for key, v in times.items()}
            row = {
                "matrix": name, "N": n, "K": k, "M": m, "weight_bytes": nbytes,
                "native_gb_per_s": gbs["native"], "torch_gb_per_s": gbs["torch"],
                "speedup": gbs["native"] / gbs["torch"],
                "native_us": statistics.median(times["native"]) * 1e6,
                "torch_us": statistics.median(times["torch"]) * 1e6,
                "max_abs_err_vs_fp32": err,
            }
            results.append(row)
            print(f"{name:20}{f'{n}x{k}':>14}{m:>3}{row['native_us'] / 1e3:11.3f}{row['torch_us'] / 1e3:10.3f}"
                  f"{gbs['native']:13.1f}{gbs['torch']:12.1f}{row['speedup']:8.2f}x{err:10.2e}")
        del weights

    prefill = []
    if args.prefill_rows > 0:
        m = args.prefill_rows
        print(f"\nprefill, M = {m}")
        print(f"{'matrix':20}{'N x K':>14}{'native ms':>11}{'torch ms':>10}{'native GFLOP/s':>16}{'torch GFLOP/s':>15}"
              f"{'speedup':>9}")
        for name, n, k in SHAPES[:4]:
            w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            times = {key: [] for key in impls}
            with torch.inference_mode():
                for fn in impls.values():  # warm-up
                    fn(x, w)
                for _ in range(args.prefill_passes):
                    for key, fn in impls.items():
                        t = time.perf_counter()
                        fn(x, w)
                        times[key].append(time.perf_counter() - t)
            med = {key: statistics.median(v) for key, v in times.items()}
            flops = {key: 2 * m * n * k / v / 1e9 for key, v in med.items()}
            prefill.append({"matrix": name, "N": n, "K": k, "M": m, "native_ms": med["native"] * 1e3,
                            "torch_ms": med["torch"] * 1e3, "native_gflop_per_s": flops["native"],
                            "torch_gflop_per_s": flops["torch"], "speedup": med["torch"] / med["native"]})
            print(f"{name:20}{f'{n}x{k}':>14}{med['native'] * 1e3:11.1f}{med['torch'] * 1e3:10.1f}"
                  f"{flops['native']:16.1f}{flops['torch']:15.1f}{med['torch'] / med['native']:8.2f}x")

    out = {
        "kernel": kernel,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "host_read_gb_per_s_fp32_sum": read_gbs,
        "passes": args.passes,
        "results": results,
        "prefill": prefill,
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
