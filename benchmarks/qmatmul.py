"""GGML quantized matmul speed: the native ``qmatmul_<type>`` kernels (AVX2 or AVX-512 VNNI tiles) vs torch's bf16
F.linear.

``--isa`` picks the tiles: ``auto`` (default) those the registry picks on this CPU (AVX-512 VNNI where the CPU
has avx512f/bw/vl/vnni, else AVX2), or ``avx2`` / ``vnni``; the JSON records which.

Decode (M = 1 rows, ``--rows``): for each weight matrix of Llama-3.2-1B (2048x2048 q/o, 512x2048 k/v,
8192x2048 gate/up, 2048x8192 down, 128256x2048 tied lm_head) and each type, the time per call and the
bandwidth of quantized weight bytes read (bytes / time). Enough copies of each weight are cycled
through that every call reads its weights from DRAM, as in decode, not from the last-level cache.
The native kernels and torch's bf16 F.linear of the same shape are timed in alternating passes so
machine noise hits both alike; the median pass is reported. From the decode times, the matmul time
of one Llama-3.2-1B token (16 layers + lm_head, every matrix of the one type) and the tokens/s that
bounds. A float32 ``sum`` over 1 GiB gives the host's plain read bandwidth for comparison.

Weights are in the layout the kernel asks for: q4_0, q4_K and q5_K interleaved by 8 rows (the ops carry
``interleave``; ``quant/ggml/interleave.py``), the rest canonical. ``--compare-layouts`` also times the same
kernel on the canonical bytes in the same alternating passes (``canonical_*`` fields, ``interleaved_speedup``).

Prefill (M = 512, ``--prefill-rows``): GFLOP/s on the gate/up and down shapes, against bf16 F.linear
(a lower bound for "dequantize, then bf16 matmul") and, when the GGML quantizer plugin is installed,
its torch reference (dequantize, then fp32 matmul).

    python benchmarks/qmatmul.py [--threads 2] [--types q4_0,q8_0,q4k,q5k,q6k] [--isa auto|avx2|vnni]
        [--compare-layouts] [--out benchmarks/results/qmatmul.json]
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

DECODE_SHAPES = [  # (name, N = out features, K = in features, matrices of this shape per token)
    ("q_proj/o_proj", 2048, 2048, 2 * 16),
    ("k_proj/v_proj", 512, 2048, 2 * 16),
    ("gate_proj/up_proj", 8192, 2048, 2 * 16),
    ("down_proj", 2048, 8192, 16),
    ("lm_head (tied)", 128256, 2048, 1),
]
PREFILL_SHAPES = [("gate_proj/up_proj", 8192, 2048), ("down_proj", 2048, 8192)]


def random_qweight(torch, name: str, n: int, k: int, generator):
    """Random bytes with every block's fp16 scale fields set to small finite values (valid blocks)."""
    from mistralrs_plugins.kernels.cpu_quant import FORMATS

    elems, nbytes, _act, _qtype = FORMATS[name]
    nb = k // elems
    q = torch.randint(0, 256, (n, nb, nbytes), dtype=torch.uint8, generator=generator)
    scale_offsets = {"q4_0": (0,), "q8_0": (0,), "q4k": (0, 2), "q5k": (0, 2), "q6k": (208,)}[name]
    for off in scale_offsets:
        d = (torch.rand(n, nb, generator=generator) * 1e-3 + 1e-4).to(torch.float16)
        q[:, :, off:off + 2] = d.view(torch.uint8).view(n, nb, 2)
    return q.view(n, nb * nbytes)


def timed_passes(impls: dict, passes: int) -> dict[str, float]:
    """Median seconds per call of each impl (a list of zero-argument calls, cycled), alternating passes;
    also the best pass of each, as ``<key>_best`` (on a shared machine the best pass is the one least
    disturbed by other work)."""
    times: dict[str, list[float]] = {key: [] for key in impls}
    for calls in impls.values():  # warm-up pass
        for call in calls:
            call()
    for _ in range(passes):
        for key, calls in impls.items():
            t = time.perf_counter()
            for call in calls:
                call()
            times[key].append((time.perf_counter() - t) / len(calls))
    out = {key: statistics.median(v) for key, v in times.items()}
    out.update({f"{key}_best": min(v) for key, v in times.items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="q4_0,q8_0,q4k,q5k,q6k")
    ap.add_argument("--rows", default="1", help="comma-separated decode M values")
    ap.add_argument("--prefill-rows", type=int, default=512, help="M of the prefill GEMM (0: skip)")
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--prefill-passes", type=int, default=3)
    ap.add_argument("--min-bytes", type=float, default=256e6, help="weight bytes cycled per pass (> LLC)")
    ap.add_argument("--isa", choices=("auto", "avx2", "vnni"), default="auto")
    ap.add_argument("--compare-layouts", action="store_true",
                    help="also time the interleaving types on canonical bytes, in the same passes")
    ap.add_argument("--out", default="benchmarks/results/qmatmul.json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mistralrs_plugins.kernels.cpu_quant import FORMATS, has_avx2, has_avx512_vnni, ops

    if not has_avx2():
        print("this CPU lacks avx2/fma/f16c: the native kernels do not run here")
        return 1
    isa = ("vnni" if has_avx512_vnni() else "avx2") if args.isa == "auto" else args.isa
    if isa == "vnni" and not has_avx512_vnni():
        print("this CPU lacks avx512f/bw/vl/vnni: the VNNI tiles do not run here")
        return 1
    print(f"tiles: {isa}")
    t = time.perf_counter()
    if ops.extension() is None:
        print(f"native kernels unavailable: {ops.status()['failed']}")
        return 1
    print(f"native kernels ready in {time.perf_counter() - t:.1f} s (build or cache load)")
    types = [s.strip() for s in args.types.split(",") if s.strip()]
    kernels = {name: getattr(ops, f"qmatmul_{name}" + ("_vnni" if isa == "vnni" else "")) for name in types}
    try:
        from mistralrs_plugins.quant.ggml import interleave, reference
    except Exception:  # noqa: BLE001 - the GGML quantizer plugin is optional here
        interleave = reference = None

    def interleaves(name: str, n: int) -> bool:
        """Whether the kernel asks for `name` weights of `n` rows interleaved."""
        return interleave is not None and getattr(kernels[name], "interleave", None) == interleave.ROWS \
            and interleave.can_interleave(name, n)

    def layout(name: str, qw):
        """The kernel's layout of canonical bytes `qw`."""
        return interleave.interleave(name, qw) if interleaves(name, qw.shape[0]) else qw

    def compared(name: str, qw) -> bool:
        return args.compare_layouts and interleaves(name, qw.shape[0])

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

    g = torch.Generator().manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    decode = []
    print(f"\ndecode: {'matrix':18}{'N x K':>12}{'M':>3}{'type':>6}{'us':>9}{'GB/s':>7}{'best':>6}   "
          f"{'bf16 F.linear us':>17}{'GB/s':>7}{'best':>6}{'speedup':>9}")
    for mname, n, k, count in DECODE_SHAPES:
        bf16_bytes = n * k * 2
        bf16_w = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
                  for _ in range(max(1, math.ceil(args.min_bytes / bf16_bytes)))]
        for name in types:
            elems, nbytes, _act, _q = FORMATS[name]
            qbytes = n * (k // elems) * nbytes
            canon = [random_qweight(torch, name, n, k, g) for _ in range(max(1, math.ceil(args.min_bytes / qbytes)))]
            qws = [layout(name, w) for w in canon]
            both = compared(name, canon[0])
            if not both:
                del canon
            for m in rows_list:
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                fn = kernels[name]
                impls = {"native": [(lambda w=w, fn=fn, x=x: fn(x, w)) for w in qws],
                         "torch": [(lambda w=w, x=x: F.linear(x, w)) for w in bf16_w]}
                if both:
                    impls["canonical"] = [(lambda w=w, fn=fn, x=x: fn(x, w)) for w in canon]
                with torch.inference_mode():
                    med = timed_passes(impls, args.passes)
                row = {
                    "matrix": mname, "N": n, "K": k, "M": m, "type": name, "per_token": count,
                    "layout": "interleaved" if qws[0].shape[0] != n else "canonical",
                    "weight_bytes": qbytes, "native_us": med["native"] * 1e6,
                    "native_gb_per_s": qbytes / med["native"] / 1e9,
                    "native_best_us": med["native_best"] * 1e6,
                    "native_best_gb_per_s": qbytes / med["native_best"] / 1e9,
                    "bf16_weight_bytes": bf16_bytes, "torch_bf16_us": med["torch"] * 1e6,
                    "torch_bf16_gb_per_s": bf16_bytes / med["torch"] / 1e9,
                    "torch_bf16_best_gb_per_s": bf16_bytes / med["torch_best"] / 1e9,
                    "speedup_vs_bf16": med["torch"] / med["native"],
                }
                if both:
                    row.update({"canonical_us": med["canonical"] * 1e6,
                                "canonical_gb_per_s": qbytes / med["canonical"] / 1e9,
                                "interleaved_speedup": med["canonical"] / med["native"]})
                decode.append(row)
                print(f"        {mname:18}{f'{n}x{k}':>12}{m:>3}{name:>6}{row['native_us']:9.0f}"
                      f"{row['native_gb_per_s']:7.1f}{row['native_best_gb_per_s']:6.1f}   "
                      f"{row['torch_bf16_us']:17.0f}{row['torch_bf16_gb_per_s']:7.1f}"
                      f"{row['torch_bf16_best_gb_per_s']:6.1f}{row['speedup_vs_bf16']:8.1f}x"
                      + (f"   canonical {row['canonical_gb_per_s']:.1f} GB/s: interleaved "
                         f"{row['interleaved_speedup']:.2f}x" if both else ""))
            del qws
        del bf16_w

    per_token = {}
    print("\nLlama-3.2-1B, one decode token (M=1), all matrices of one type: matmul time and the tokens/s it bounds")
    for name in ["bf16"] + types:
        key = "torch_bf16_us" if name == "bf16" else "native_us"
        rows = [r for r in decode if r["M"] == 1 and r["type"] == (types[0] if name == "bf16" else name)]
        if len(rows) != len(DECODE_SHAPES):
            continue
        us = sum(r[key] * r["per_token"] for r in rows)
        best_key = "torch_bf16_best_gb_per_s" if name == "bf16" else "native_best_gb_per_s"
        bytes_key = "bf16_weight_bytes" if name == "bf16" else "weight_bytes"
        best_us = sum(r[bytes_key] / r[best_key] / 1e3 * r["per_token"] for r in rows)
        per_token[name] = {"matmul_ms": us / 1e3, "tokens_per_s_bound": 1e6 / us,
                           "matmul_ms_best_passes": best_us / 1e3}
        label = "torch bf16 F.linear" if name == "bf16" else f"native {name}"
        print(f"  {label:22}{us / 1e3:8.2f} ms/token  -> {1e6 / us:6.1f} tok/s   "
              f"(best passes: {best_us / 1e3:.2f} ms -> {1e6 / best_us:.1f} tok/s)")

    prefill = []
    if args.prefill_rows > 0:
        m = args.prefill_rows
        print(f"\nprefill (M={m}): GFLOP/s   {'type':>6}{'native':>9}{'bf16 F.linear':>15}"
              f"{'reference':>11}{'vs bf16':>9}")
        for mname, n, k in PREFILL_SHAPES:
            flops = 2.0 * m * n * k
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
            with torch.inference_mode():
                torch_s = timed_passes({"t": [lambda x=x, w=w: F.linear(x, w)]}, args.prefill_passes)["t"]
            for name in types:
                cw = random_qweight(torch, name, n, k, g)
                qw = layout(name, cw)
                fn = kernels[name]
                impls = {"native": [lambda fn=fn, x=x, qw=qw: fn(x, qw)]}
                both = compared(name, cw)
                if both:
                    impls["canonical"] = [lambda fn=fn, x=x, cw=cw: fn(x, cw)]
                ref_fn = getattr(reference, f"qmatmul_{name}", None) if reference is not None else None
                if ref_fn is not None:
                    impls["reference"] = [lambda ref_fn=ref_fn, x=x, cw=cw: ref_fn(x, cw)]
                try:
                    with torch.inference_mode():
                        med = timed_passes(impls, args.prefill_passes)
                except Exception:  # noqa: BLE001 - a reference still being written must not stop the run
                    impls.pop("reference", None)
                    with torch.inference_mode():
                        med = timed_passes(impls, args.prefill_passes)
                row = {
                    "matrix": mname, "N": n, "K": k, "M": m, "type": name,
                    "native_ms": med["native"] * 1e3, "native_gflop_per_s": flops / med["native"] / 1e9,
                    "torch_bf16_ms": torch_s * 1e3, "torch_bf16_gflop_per_s": flops / torch_s / 1e9,
                    "reference_gflop_per_s": flops / med["reference"] / 1e9 if "reference" in med else None,
                    "speedup_vs_bf16": torch_s / med["native"],
                    "layout": "interleaved" if qw is not cw else "canonical",
                }
                if both:
                    row.update({"canonical_gflop_per_s": flops / med["canonical"] / 1e9,
                                "interleaved_speedup": med["canonical"] / med["native"]})
                prefill.append(row)
                ref_txt = f"{row['reference_gflop_per_s']:11.1f}" if row["reference_gflop_per_s"] else f"{'-':>11}"
                print(f"  {mname:18}{f'{n}x{k}':>12}{name:>6}{row['native_gflop_per_s']:9.1f}"
                      f"{row['torch_bf16_gflop_per_s']:15.1f}{ref_txt}{row['speedup_vs_bf16']:8.1f}x"
                      + (f"   canonical {row['canonical_gflop_per_s']:.1f}: interleaved "
                         f"{row['interleaved_speedup']:.2f}x" if both else ""))

    out = {
        "threads": args.threads,
        "isa": isa,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "host_read_gb_per_s_fp32_sum": read_gbs,
        "passes": args.passes,
        "decode": decode,
        "llama_3_2_1b_decode_token": per_token,
        "prefill": prefill,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
