"""Decode and prefill speed of pre-quantized checkpoints next to bf16, in one run.

Writes a random-weight Llama of the given shape (default Llama-3.2-1B's; float16 safetensors),
packs it as GPTQ (4-bit symmetric, groups of 128: the q4_0 fast path), AWQ (4-bit, groups of 128),
FP8 (128x128 blocks), bitsandbytes nf4 (double-quantized), MLX afq4, HQQ 4-bit (groups of 64 along
axis 1, hqq's own quantizer) and MXFP4 with the test packers (tests/helpers/packed_checkpoints.py),
then runs ``mistralrs bench`` (2 threads) on each and on the float checkpoint loaded as bf16.
Prints a table and writes benchmarks/results/prequantized_speed.json; formats not run this time
keep their earlier rows there (same layers and threads).

    python benchmarks/prequantized_speed.py [--layers 16] [--gen-len 16] [--formats gptq,awq,fp8,bnb,mlx,hqq,mxfp4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "prequantized_speed.json"


def bench(model: Path, args: argparse.Namespace, dtype: str = "bf16") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MISTRALRS_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "mistralrs", "bench", "-m", str(model), "--dtype", dtype, "--prompt-len",
           str(args.prompt_len), "--gen-len", str(args.gen_len), "--iterations", "1", "--warmup", "1", "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    out = json.loads(r.stdout)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="gptq,awq,fp8,bnb,mlx,hqq,mxfp4")
    ap.add_argument("--dir", type=Path, default=Path("/work/bench-cache/prequantized"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from load_memory import write_checkpoint

    from tests.helpers import packed_checkpoints as P

    src = args.dir / f"llama-1b-shape-{args.layers}l-f16"
    if not (src / "model.safetensors").is_file():
        write_checkpoint(src, hidden=2048, layers=args.layers, intermediate=8192, vocab=128256, heads=32, kv_heads=8,
                         dtype="f16")
        from mistralrs.demo import demo_model_dir

        for name in ("tokenizer.json", "tokenizer_config.json"):  # bench feeds token ids: the demo's will do
            (src / name).write_bytes((demo_model_dir() / name).read_bytes())
    writers = {
        "gptq": lambda d: P.write_packed(src, d, "gptq", bits=4, group_size=128, sym=True),
        "awq": lambda d: P.write_packed(src, d, "awq", group_size=128, sym=False),
        "fp8": lambda d: P.write_fp8(src, d, block=(128, 128)),
        "bnb": lambda d: P.write_bnb(src, d, kind="nf4", nested=True),
        "mlx": lambda d: P.write_mlx(src, d, bits=4, group_size=64,
                                     quantized=lambda n: n.endswith("_proj.weight")),
        "hqq": lambda d: P.write_hqq(src, d, nbits=4, group_size=64, axis=1, compute_dtype="float16"),
        "mxfp4": lambda d: P.write_mxfp4(src, d),
    }
    results = {}
    if args.out.is_file():  # rows of formats not run this time stay
        old = json.loads(args.out.read_text())
        if old.get("layers") == args.layers and old.get("threads") == args.threads:
            results.update(old.get("results", {}))
    results["bf16"] = bench(src, args)
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        d = args.dir / f"{src.name}-{fmt}"
        if not (d / "model.safetensors").is_file():
            writers[fmt](d)
        results[fmt] = bench(d, args, dtype="bf16")
        print(fmt, json.dumps(results[fmt])[:300], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "prequantized_speed", "date": time.strftime("%Y-%m-%d"),
                                    "layers": args.layers, "threads": args.threads, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
