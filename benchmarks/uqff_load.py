"""Loading a UQFF file against safetensors + ISQ of the same type, in one run.

Writes a random-weight Llama checkpoint (bf16 safetensors; by default the Llama-3.2-1B shape),
then, each in a fresh subprocess:

1. ``isq``: `load_model` with ``--isq TYPE`` (quantizes every layer while loading), timed; the
   same process then writes the result as UQFF (`mistralrs quantize`'s writer), also timed;
2. ``uqff``: `load_uqff` of those shards, timed, with its peak RSS.

Each is timed until the model is ready: loaded and one token through it (UQFF layers are views of
the mapped files, whose pages are read on first use; the forward makes them count). Prints and
writes (benchmarks/results/uqff_load.json) the ready seconds of both, their ratio
(target >= 3x) and the UQFF load's peak RSS above the RSS after ``import torch``, relative to the
size of the UQFF files (target <= 1.2). Each load runs `--reps` times (alternating, best kept).

    python benchmarks/uqff_load.py                      # q4k, 1B shape
    python benchmarks/uqff_load.py --isq q8_0 --layers 4
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_memory import write_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "uqff_load.json"

CHILD = r"""
import json, sys, time
import torch
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
mode, ckpt, out, isq = sys.argv[1:5]
t0 = time.perf_counter()
result = {}
if mode == "isq":
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan
    plan = IsqPlan(isq)
    loaded = load_model(ckpt, dtype="bf16", quant_method_for=plan.method_for)
    result["load_seconds"] = time.perf_counter() - t0
    if out != "-":
        from mistralrs.uqff.writer import write_metadata, write_shards
        t1 = time.perf_counter()
        report = write_shards(loaded.model, out, isq, quant=isq, targeted=plan.target_name)
        write_metadata(loaded.model, out, ckpt, outputs=[report])
        result["write_seconds"] = time.perf_counter() - t1
else:
    from mistralrs.uqff.loading import load_uqff, resolve_uqff_files
    loaded = load_uqff(resolve_uqff_files(isq, out), dtype="bf16")
    result["load_seconds"] = time.perf_counter() - t0
# Ready: one token through the model, so that weights read lazily (mapped pages) are counted too.
from mistralrs.loading import build_attention_backend
backend = build_attention_backend(loaded, name="sdpa")
with torch.no_grad():
    loaded.model.compute_logits(loaded.model(torch.tensor([1]), torch.tensor([0]), backend.batch([0, 1], [1])))
result["ready_seconds"] = time.perf_counter() - t0 - result.get("write_seconds", 0.0)
result["peak_rss_above_torch"] = status("VmHWM") - base
print(json.dumps(result))
"""


def child(mode: str, ckpt: Path, out: Path | str, isq: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(ckpt), str(out), isq],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isq", default="q4k")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mistralrs-uqff-load-") as tmp:
        work = args.dir or Path(tmp)
        ckpt, out = work / "ckpt", work / "uqff"
        if not (ckpt / "model.safetensors").is_file():
            write_checkpoint(ckpt, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                             vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads, dtype="bf16")
        first = child("isq", ckpt, out, args.isq)
        isq_runs, uqff_runs = [first], []
        for rep in range(args.reps):
            uqff_runs.append(child("uqff", ckpt, out, args.isq))
            if rep + 1 < args.reps:
                isq_runs.append(child("isq", ckpt, "-", args.isq))
        uqff_bytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".uqff" or p.name == "residual.safetensors")
        ckpt_bytes = (ckpt / "model.safetensors").stat().st_size
    isq_s = min(r["ready_seconds"] for r in isq_runs)
    uqff_s = min(r["ready_seconds"] for r in uqff_runs)
    rss = min(r["peak_rss_above_torch"] for r in uqff_runs)
    result = {
        "benchmark": "uqff_load", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "isq": args.isq,
        "shape": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate, "vocab": args.vocab,
                  "heads": args.heads, "kv_heads": args.kv_heads},
        "checkpoint_bytes": ckpt_bytes, "uqff_bytes": uqff_bytes,
        "isq_ready_seconds": round(isq_s, 3), "uqff_write_seconds": round(first["write_seconds"], 3),
        "uqff_ready_seconds": round(uqff_s, 3),
        "uqff_load_call_seconds": round(min(r["load_seconds"] for r in uqff_runs), 3), "speedup": round(isq_s / uqff_s, 2), "speedup_target": 3.0,
        "uqff_peak_rss_above_torch": rss, "uqff_rss_ratio": round(rss / uqff_bytes, 3), "rss_ratio_target": 1.2,
    }
    print(f"{args.isq}: ready after safetensors + ISQ {isq_s:.2f} s, after UQFF {uqff_s:.2f} s -> {isq_s / uqff_s:.1f}x faster "
          f"(target 3x); UQFF peak RSS {rss / 2**20:.0f} MiB for {uqff_bytes / 2**20:.0f} MiB of files "
          f"= {rss / uqff_bytes:.2f}x (target <= 1.2); writing took {first['write_seconds']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
