"""Static throughput of the cpu_quant tiles (llvm-mca) on CPUs this machine is not: the canonical against the
interleaved layout, per type and regime, in cycles per 1000 int8 products of the tile's hot loop.

What it answers: which layout's tiles leave the core less work on a CPU we cannot run on (the AVX-512 VNNI tiles on
Zen 4, the AVX-VNNI ones on Alder Lake), before that CPU is at hand. What it cannot: anything about memory (decode
reads W from DRAM, where the layouts differ in streams and prefetching, not in cycles), or the accuracy of LLVM's
scheduling model. `benchmarks/qmatmul.py --compare-layouts` measures; this predicts.

  python benchmarks/tile_mca.py                    # all ISAs, each on its default -mcpu
  python benchmarks/tile_mca.py --isa vnni --mcpu znver5

The tiles come from the cached build of the cpu_quant extension (built first if needed): the hot loop of each
tile is its conditional backward branch with the most dot-product instructions (prefetch loops inside it are
taken once), and the products per iteration are counted from those instructions (`vpdpbusd` 4 per int32 lane,
`vpmaddubsw` 1 per byte). Needs objdump and llvm-mca (Debian: binutils, llvm-19).

Model fix (on by default, --no-fix to see the raw model): LLVM 19's Zen 4 model gives `vpdpbusd` one issue per 2
cycles for ymm and zmm alike; on Zen 4 it issues like an FMA (ymm 2 a cycle, zmm 1: our register-only loop ran
919 GOP/s on two cores, ~1 zmm a cycle at ~3.6 GHz), so each `vpdpbusd` is scheduled as a `vfmadd231ps` of the same
width (same pipes, latency 4, and the same accumulator dependency).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

# (object file, default -mcpu, {(type, regime): (canonical tile, interleaved tile)}); regime: gemv (M = 1) or gemm
# (the tile the prefill runs). The canonical tiles are those `tile_fn` picks; AVX-VNNI has no canonical tiles of
# its own (the AVX2 op runs them).
_A = "(anonymous namespace)::"
ISAS = {
    "avx2": ("qmatmul.o", "znver3", {
        ("q4_0", "gemv"): ("tile_q0<1, 4, true>", f"tile_q4_0x8<{_A}Avx2Int16, 1, 2>"),
        ("q4_0", "gemm"): ("tile_q0<6, 1, true>", f"tile_q4_0x8<{_A}Avx2Int16, 4, 1>"),
        ("q4k", "gemv"): ("tile_q45_K<1, 2, false>", f"tile_q45_Kx8<{_A}Avx2Int16, 1, 2, false>"),
        ("q4k", "gemm"): ("tile_q45_K<6, 1, false>", f"tile_q45_Kx8<{_A}Avx2Int16, 4, 1, false>"),
        ("q5k", "gemv"): ("tile_q45_K<1, 2, true>", f"tile_q45_Kx8<{_A}Avx2Int16, 1, 2, true>"),
        ("q5k", "gemm"): ("tile_q45_K<6, 1, true>", f"tile_q45_Kx8<{_A}Avx2Int16, 4, 1, true>"),
    }),
    "vnni": ("qmatmul_avx512.o", "znver4", {
        ("q4_0", "gemv"): ("tile_q0<1, 2, true>", f"tile_q4_0x8<{_A}Vnni, 1, 2>"),
        ("q4_0", "gemm"): ("tile_q0<4, 4, true>", f"tile_q4_0x8<{_A}Vnni, 8, 1>"),
        ("q4k", "gemv"): ("gemv_q45_K<4, false>", f"tile_q45_Kx8<{_A}Vnni, 1, 2, false>"),
        ("q4k", "gemm"): ("tile_q45_K<16, 1, false>", f"tile_q45_Kx8<{_A}Vnni, 8, 1, false>"),
        ("q5k", "gemv"): ("gemv_q45_K<4, true>", f"tile_q45_Kx8<{_A}Vnni, 1, 2, true>"),
        ("q5k", "gemm"): ("tile_q45_K<16, 1, true>", f"tile_q45_Kx8<{_A}Vnni, 8, 1, true>"),
    }),
    "avxvnni": ("qmatmul_avxvnni.o", "alderlake", {
        (t, r): (None, f"tile_q45_Kx8<{_A}AvxVnni, {'1, 2' if r == 'gemv' else '4, 1'}, {str(t == 'q5k').lower()}>"
                 if t != "q4_0" else f"tile_q4_0x8<{_A}AvxVnni, {'1, 2' if r == 'gemv' else '4, 1'}>")
        for t in ("q4_0", "q4k", "q5k") for r in ("gemv", "gemm")
    }),
}
# int8 products per dot-product instruction, by register width
_DOT = re.compile(r"^(?:\{vex\}\s*)?(vpdpbusd|vpmaddubsw)\s.*%([xyz])mm\d+$")
_PRODUCTS = {("vpdpbusd", "x"): 16, ("vpdpbusd", "y"): 32, ("vpdpbusd", "z"): 64,
             ("vpmaddubsw", "x"): 16, ("vpmaddubsw", "y"): 32, ("vpmaddubsw", "z"): 64}
_JUMP = re.compile(r"^(j(?!mp)\w+)\s+([0-9a-f]+)\b")


def functions(obj: Path) -> dict[str, list[str]]:
    """Demangled function name -> its instructions (address-free, comments dropped, branch targets as addresses)."""
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    out: dict[str, list[str]] = {}
    for chunk in re.split(r"\n(?=[0-9a-f]{16} <)", dis):
        head, _, body = chunk.partition("\n")
        m = re.match(r"[0-9a-f]{16} <(.*)>:", head)
        if m:
            out[m.group(1)] = [ln for ln in body.split("\n") if re.match(r"\s*[0-9a-f]+:\s", ln)]
    return out


def hot_loop(lines: list[str]) -> tuple[list[str], int]:
    """The body of the conditional backward branch holding the most dot products, and its products per pass."""
    addr = [int(ln.split(":", 1)[0], 16) for ln in lines]
    ins = [ln.split(":", 1)[1].split("#")[0].strip() for ln in lines]
    best: tuple[int, int, int] | None = None
    for i, text in enumerate(ins):
        m = _JUMP.match(text)
        if not m or int(m.group(2), 16) > addr[i] or int(m.group(2), 16) not in addr:
            continue
        s = addr.index(int(m.group(2), 16))
        products = sum(_PRODUCTS[(d.group(1), d.group(2))] for t in ins[s:i + 1] if (d := _DOT.match(t)))
        if products and (best is None or products > best[2]):
            best = (s, i, products)
    if best is None:
        raise ValueError("no loop with dot products")
    body = []
    for text in ins[best[0]:best[1] + 1]:
        body.append(re.sub(r"^(j\w+|call)\s+[0-9a-f]+\b.*", r"\1 .Lloop", text))
    return body, best[2]


def mca(body: list[str], mcpu: str, fix: bool, iterations: int = 300) -> float:
    """llvm-mca's cycles per iteration of `body`."""
    if fix:  # see the module docstring
        body = [re.sub(r"^(\{vex\}\s*)?vpdpbusd\b", "vfmadd231ps", t) for t in body]
    src = ".Lloop:\n" + "\n".join(body) + "\n"
    res = subprocess.run([LLVM_MCA, f"-mcpu={mcpu}", f"-iterations={iterations}", "-resource-pressure=0",
                          "-instruction-info=0"], input=src, capture_output=True, text=True, check=True)
    return int(re.search(r"Total Cycles:\s+(\d+)", res.stdout).group(1)) / iterations


def build_dir() -> Path:
    from mistralrs_plugins.kernels import native_build
    from mistralrs_plugins.kernels.cpu_quant import ops

    ops.build()
    return native_build.cache_root() / ops.build_key()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", choices=(*ISAS, "all"), default="all")
    ap.add_argument("--mcpu", default=None, help="llvm-mca -mcpu (default: the ISA's own: znver3, znver4, alderlake)")
    ap.add_argument("--no-fix", action="store_true", help="schedule vpdpbusd as LLVM's model has it")
    ap.add_argument("--out", default="benchmarks/results/tile_mca.json")
    args = ap.parse_args()
    global LLVM_MCA
    # the newest: older ones lack newer CPUs' models (llvm-mca-14 has no znver4)
    LLVM_MCA = next((p for p in (*(f"llvm-mca-{v}" for v in range(30, 13, -1)), "llvm-mca") if shutil.which(p)), "")
    if not LLVM_MCA or not shutil.which("objdump"):
        print("tile_mca: needs llvm-mca and objdump (Debian: apt-get install llvm-19 binutils)", file=sys.stderr)
        return 2
    d = build_dir()
    rows = []
    for isa in ISAS if args.isa == "all" else (args.isa,):
        obj, default_cpu, pairs = ISAS[isa]
        mcpu = args.mcpu or default_cpu
        fns = functions(d / obj)
        canon_fns = fns if isa != "avxvnni" else functions(d / "qmatmul.o")
        for (qtype, regime), (canon, inter) in pairs.items():
            if isa == "avxvnni":
                canon = ISAS["avx2"][2][(qtype, regime)][0]
            row = {"isa": isa, "mcpu": mcpu, "type": qtype, "regime": regime}
            for side, name, table in (("canonical", canon, canon_fns), ("interleaved", inter, fns)):
                full = next(f for f in table if re.search(rf"\b{re.escape(name)}\(", f))
                body, products = hot_loop(table[full])
                cycles = mca(body, mcpu, not args.no_fix)
                row[side] = {"tile": name, "instructions": len(body), "products": products,
                             "cycles": round(cycles, 2), "cycles_per_1000": round(1000 * cycles / products, 2)}
            row["interleaved_over_canonical"] = round(
                row["canonical"]["cycles_per_1000"] / row["interleaved"]["cycles_per_1000"], 2)
            rows.append(row)
            print(f"{isa:8} {mcpu:10} {qtype:5} {regime}: cycles / 1000 products canonical "
                  f"{row['canonical']['cycles_per_1000']:6.1f}, interleaved {row['interleaved']['cycles_per_1000']:6.1f}"
                  f" -> interleaved {row['interleaved_over_canonical']:.2f}x", flush=True)
    out = {"llvm_mca": subprocess.run([LLVM_MCA, "--version"], capture_output=True, text=True).stdout.split("\n")[1].strip(),
           "vpdpbusd_fix": not args.no_fix, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


LLVM_MCA = ""

if __name__ == "__main__":
    sys.exit(main())
