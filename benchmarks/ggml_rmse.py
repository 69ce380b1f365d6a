"""GGML block formats vs llama.cpp's C reference: identical bytes, RMSE, and quantization speed.

Builds llama.cpp's ``ggml-quants.c`` into a throw-away shared library (gcc, plain ``-O2``: no
``-march=native``, so no FMA contraction; it changes roundings, see below), then for every type
quantizes the same fixed-seed matrix with the C reference (``quantize_row_*_ref``) and with
`mistralrs_plugins.quant.ggml.formats.quantize`, and reports:

- how many blocks differ (0 = the bytes are identical),
- the RMSE of both round trips (each dequantized by our `dequantize`, which matches
  ``dequantize_row_*`` bit for bit; checked here too),
- the time of both on the matrix: wall seconds, and CPU seconds (all threads; unlike wall time,
  barely moved by other processes on a busy machine). C is one thread; ours uses
  ``torch.get_num_threads()`` worker threads.

``--imatrix`` does the same with an importance vector (a fixed-seed log-normal ``[cols]``, as
llama.cpp's imatrix): the C code's ``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)``
(``quantize_row_*_impl``) against ``quantize(name, x, importance=...)``, plus the
importance-weighted RMSE of both and of the unweighted reference; results in
``benchmarks/results/ggml_rmse_imatrix.json``.

``--pin`` prints the constants of ``tests/unit/quant/test_ggml_formats.py`` (the sha256 of the C
reference's bytes and its RMSE on the test's deterministic matrix) instead.

    LLAMA_CPP_SRC=/path/to/llama.cpp python benchmarks/ggml_rmse.py [--rows 8192 --cols 2048] [--threads 2]

Note: llama.cpp's own builds use ``-march=native``; where the CPU has FMA, gcc contracts
``a*b + c`` in the k-quant searches and a few percent of Q2_K..Q6_K blocks come out different
from the plain reference (``--native`` compares against such a build too). Both are "llama.cpp";
the plain build is the C source's exact float semantics, which is what we reproduce.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
C_NAMES = {"q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0", "q8_1": "q8_1",
           "q2k": "q2_K", "q3k": "q3_K", "q4k": "q4_K", "q5k": "q5_K", "q6k": "q6_K", "q8k": "q8_K"}
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(int type, long long ne) {  /* quantize_<type> (the quant_weights entry points) needs it */
    switch (type) {
        case 2: return ne / 32 * 18;  case 3: return ne / 32 * 20;  case 6: return ne / 32 * 22;
        case 7: return ne / 32 * 24;  case 8: return ne / 32 * 34;
        case 10: return ne / 256 * 84; case 11: return ne / 256 * 110; case 12: return ne / 256 * 144;
        case 13: return ne / 256 * 176; case 14: return ne / 256 * 210;
    }
    abort();
}
const char * ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }
"""


def find_quants_c(src: str | os.PathLike) -> Path:
    """ggml-quants.c under a llama.cpp checkout (or its ggml/ or ggml/src/ directory)."""
    root = Path(src)
    for cand in (root / "ggml/src/ggml-quants.c", root / "src/ggml-quants.c", root / "ggml-quants.c",
                 root / "vendor/llama.cpp/ggml/src/ggml-quants.c"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no ggml-quants.c under {root}")


def build_reference(src: str | os.PathLike, out_dir: str | os.PathLike, native: bool = False) -> ctypes.CDLL:
    """Compile ggml-quants.c (+ stubs for the four ggml.c symbols it links against) and load it."""
    qc = find_quants_c(src)
    ggml_src = qc.parent
    inc = [ggml_src, ggml_src.parent / "include", ggml_src / "ggml-cpu"]
    out_dir = Path(out_dir)
    stubs = out_dir / "stubs.c"
    stubs.write_text(STUBS)
    lib = out_dir / ("libggmlq_native.so" if native else "libggmlq.so")
    flags = ["-O3", "-march=native"] if native else ["-O2"]
    cmd = ["gcc", *flags, "-DNDEBUG", "-fPIC", "-shared", "-w", str(qc), str(stubs),
           *[f"-I{p}" for p in inc], "-o", str(lib), "-lm"]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def c_quantize(lib: ctypes.CDLL, name: str, x: np.ndarray, type_size: int, block: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, cols // block * type_size), np.uint8)  # zeroed: Q8_K leaves an all-zero block's bsums unset
    fn = getattr(lib, f"quantize_row_{C_NAMES[name]}_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def c_quantize_imatrix(lib: ctypes.CDLL, name: str, x: np.ndarray, importance: np.ndarray, type_size: int,
                       block: int) -> np.ndarray:
    """llama.cpp's ``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)`` with `importance` ``[cols]``
    (q8_0 ignores it; there is no such entry point for q8_1/q8_k)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    imp = np.ascontiguousarray(importance, dtype=np.float32)
    rows, cols = x.shape
    assert imp.shape == (cols,)
    out = np.zeros((rows, cols // block * type_size), np.uint8)
    fn = getattr(lib, f"quantize_{C_NAMES[name]}")
    fn.restype = ctypes.c_size_t
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(rows),
       ctypes.c_int64(cols), imp.ctypes.data_as(ctypes.c_void_p))
    return out


def c_dequantize(lib: ctypes.CDLL, name: str, data: np.ndarray, cols: int) -> np.ndarray | None:
    fn = getattr(lib, f"dequantize_row_{C_NAMES[name]}", None)
    if fn is None:  # llama.cpp has no dequantize_row_q8_1
        return None
    data = np.ascontiguousarray(data)
    out = np.zeros((data.shape[0], cols), np.float32)
    fn(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
    return out


def pinned_matrix() -> tuple[np.ndarray, int]:
    """The deterministic matrix of tests/unit/quant/test_ggml_formats.py and its number of RMSE rows."""
    sys.path.insert(0, str(ROOT))
    from tests.unit.quant.test_ggml_formats import PINNED_RMSE_ROWS, pinned_matrix
    return pinned_matrix(), PINNED_RMSE_ROWS


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-src", default=os.environ.get("LLAMA_CPP_SRC"), help="llama.cpp source tree (or $LLAMA_CPP_SRC)")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.02, help="std of the gaussian matrix")
    ap.add_argument("--types", default="q4_0,q4_1,q5_0,q5_1,q8_0,q8_1,q2k,q3k,q4k,q5k,q6k,q8k")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--native", action="store_true", help="also compare with a -march=native build of the C code")
    ap.add_argument("--pin", action="store_true", help="print the test's pinned constants and exit")
    ap.add_argument("--imatrix", action="store_true", help="compare the importance-weighted quantizers instead")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/ggml_rmse[_imatrix].json")
    args = ap.parse_args()
    if not args.llama_src:
        ap.error("point --llama-src or LLAMA_CPP_SRC at a llama.cpp source tree")
    if args.out is None:
        args.out = "benchmarks/results/ggml_rmse_imatrix.json" if args.imatrix else "benchmarks/results/ggml_rmse.json"
    if args.imatrix:
        return imatrix_main(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "plugins"))
    from mistralrs_plugins.quant.ggml.formats import FORMATS, dequantize, quantize

    tmp = tempfile.mkdtemp(prefix="ggmlq-")
    lib = build_reference(args.llama_src, tmp)
    native = build_reference(args.llama_src, tmp, native=True) if args.native else None
    names = args.types.split(",")

    if args.pin:
        x, rows = pinned_matrix()
        print("C_SHA256 = {")
        for name in names:
            f = FORMATS[name]
            print(f'    "{name}": "{hashlib.sha256(c_quantize(lib, name, x, f.type_size, f.block_size).tobytes()).hexdigest()}",')
        print("}\nC_RMSE = {")
        for name in names:
            f = FORMATS[name]
            q = c_quantize(lib, name, x[:rows], f.type_size, f.block_size)
            d = dequantize(name, torch.from_numpy(q), x.shape[1]).numpy()
            print(f'    "{name}": {rmse(d, x[:rows]):.6e},')
        print("}")
        return 0

    rng = np.random.default_rng(args.seed)
    x = (rng.standard_normal((args.rows, args.cols)) * args.scale).astype(np.float32)
    xt = torch.from_numpy(x).to(torch.bfloat16)  # models arrive in bf16: quantize what both see
    x = xt.float().numpy()
    print(f"matrix {args.rows}x{args.cols} gaussian*{args.scale} (bf16 values), seed {args.seed}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'type':6}{'blocks differing':>18}{'dequant==C':>11}{'RMSE C':>12}{'RMSE ours':>12}{'ratio':>8}"
          f"{'C s':>7}{'ours s':>8}{'C cpu':>7}{'ours cpu':>9}{'ours dq s':>10}" + ("  native-vs-plain" if native else ""))
    results = []
    for name in names:
        f = FORMATS[name]
        t, c = time.perf_counter(), time.process_time()
        ref = c_quantize(lib, name, x, f.type_size, f.block_size)
        t_c, cpu_c = time.perf_counter() - t, time.process_time() - c
        quantize(name, xt[:256])  # warm-up
        t, c = time.perf_counter(), time.process_time()
        ours = quantize(name, xt).numpy()
        t_ours, cpu_ours = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        dq = dequantize(name, torch.from_numpy(ref), args.cols).numpy()
        t_dq = time.perf_counter() - t
        cdq = c_dequantize(lib, name, ref, args.cols)
        dq_same = "n/a" if cdq is None else str(bool(np.array_equal(dq.view(np.uint32), cdq.view(np.uint32))))
        differ = int((ours.reshape(-1, f.type_size) != ref.reshape(-1, f.type_size)).any(1).sum())
        nblocks = ours.size // f.type_size
        r_c = rmse(dq, x)
        r_ours = rmse(dequantize(name, torch.from_numpy(ours), args.cols).numpy(), x)
        row = {"type": name, "ggml_type": f.ggml_type, "blocks": nblocks, "blocks_differing": differ,
               "dequant_matches_c": dq_same, "rmse_c": r_c, "rmse_ours": r_ours,
               "c_seconds_1_thread": t_c, "c_cpu_seconds": cpu_c, "ours_quantize_seconds": t_ours,
               "ours_quantize_cpu_seconds": cpu_ours, "ours_dequantize_seconds": t_dq}
        extra = ""
        if native is not None:
            nat = c_quantize(native, name, x, f.type_size, f.block_size)
            row["native_blocks_differing"] = int((nat.reshape(-1, f.type_size) != ref.reshape(-1, f.type_size)).any(1).sum())
            extra = f"  {row['native_blocks_differing']}/{nblocks}"
        results.append(row)
        print(f"{name:6}{f'{differ}/{nblocks}':>18}{dq_same:>11}{r_c:12.4e}{r_ours:12.4e}{r_ours / r_c:8.4f}"
              f"{t_c:7.2f}{t_ours:8.2f}{cpu_c:7.2f}{cpu_ours:9.2f}{t_dq:10.3f}{extra}", flush=True)
    out = {"rows": args.rows, "cols": args.cols, "seed": args.seed, "scale": args.scale,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def imatrix_main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "plugins"))
    from mistralrs_plugins.quant.ggml.formats import FORMATS, dequantize, quantize

    lib = build_reference(args.llama_src, tempfile.mkdtemp(prefix="ggmlq-"))
    names = [n for n in args.types.split(",") if n not in ("q8_1", "q8k")]  # no quantize_q8_1/q8_K entry point
    rng = np.random.default_rng(args.seed)
    xt = torch.from_numpy((rng.standard_normal((args.rows, args.cols)) * args.scale).astype(np.float32)).to(torch.bfloat16)
    x = xt.float().numpy()
    imp = np.exp(rng.standard_normal(args.cols) * 1.5).astype(np.float32)  # mean squared activations: skewed
    impt = torch.from_numpy(imp)
    w = imp.astype(np.float64) / imp.mean()

    def wrmse(d: np.ndarray) -> float:
        return float(np.sqrt(np.mean((d.astype(np.float64) - x) ** 2 * w)))

    print(f"matrix {args.rows}x{args.cols} gaussian*{args.scale} (bf16 values), importance exp(1.5 N(0,1)), "
          f"seed {args.seed}; torch threads {torch.get_num_threads()}")
    print(f"{'type':6}{'blocks identical':>18}{'RMSE C':>12}{'RMSE ours':>12}{'wRMSE C':>12}{'wRMSE ours':>12}"
          f"{'wRMSE ref':>12}{'C s':>7}{'ours s':>8}{'ours cpu':>9}")
    results = []
    for name in names:
        f = FORMATS[name]
        t = time.perf_counter()
        ref = c_quantize_imatrix(lib, name, x, imp, f.type_size, f.block_size)
        t_c = time.perf_counter() - t
        quantize(name, xt[:16], importance=impt)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        ours = quantize(name, xt, importance=impt).numpy()
        t_ours, cpu_ours = time.perf_counter() - t, time.process_time() - c
        nblocks = ours.size // f.type_size
        same = nblocks - int((ours.reshape(-1, f.type_size) != ref.reshape(-1, f.type_size)).any(1).sum())
        dq_c = dequantize(name, torch.from_numpy(ref), args.cols).numpy()
        dq_o = dequantize(name, torch.from_numpy(ours), args.cols).numpy()
        dq_r = dequantize(name, quantize(name, xt), args.cols).numpy()
        row = {"type": name, "blocks": nblocks, "blocks_identical": same, "rmse_c": rmse(dq_c, x),
               "rmse_ours": rmse(dq_o, x), "weighted_rmse_c": wrmse(dq_c), "weighted_rmse_ours": wrmse(dq_o),
               "weighted_rmse_unweighted_reference": wrmse(dq_r), "c_seconds_1_thread": t_c,
               "ours_quantize_seconds": t_ours, "ours_quantize_cpu_seconds": cpu_ours}
        results.append(row)
        print(f"{name:6}{f'{same}/{nblocks}':>18}{row['rmse_c']:12.4e}{row['rmse_ours']:12.4e}"
              f"{row['weighted_rmse_c']:12.4e}{row['weighted_rmse_ours']:12.4e}{row['weighted_rmse_unweighted_reference']:12.4e}"
              f"{t_c:7.2f}{t_ours:8.2f}{cpu_ours:9.2f}", flush=True)
    out = {"rows": args.rows, "cols": args.cols, "seed": args.seed, "scale": args.scale, "importance": "exp(1.5 N(0,1))",
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
