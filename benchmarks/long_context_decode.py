"""Batch-1 decode deep into a long context, ours next to llama.cpp's, in one run.

The 1B-shaped dummy Llama of benchmarks/quant_speed.py (the same GGUF files llama.cpp runs; ours quantizes
the bf16 model at load, ``--isq``). For each depth: ours decodes ``--gen-len`` tokens after a prompt of
``depth`` tokens (decode tok/s from the request's own timing: tokens after the first over the time after the
first); llama.cpp: ``llama-bench -p 0 -n GEN_LEN -d DEPTH`` (best sample). Decode reads the whole KV cache
per token, so this is where attention shows, after the weights.

    LLAMA_CPP_DIR=... python benchmarks/long_context_decode.py [--type q4_0] [--depths 0,2048,4000]
        [--gen-len 64] [--reps 2] [--out benchmarks/results/long_context_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_speed as Q  # noqa: E402 - the shared model, prompts and llama.cpp helpers


def ours(qtype: str, depths: list[int], gen_len: int, reps: int, model_dir: Path) -> dict[int, dict]:
    args = argparse.Namespace(prompt_len=max(depths), gen_len=gen_len, concurrency=1)
    svc = Q.open_ours(qtype, args, model_dir)
    Q._run(svc.engine, [Q._request(0, 64, 4)])  # warm-up
    out = {}
    for depth in depths:
        rates = []
        for r in range(reps):
            done = Q._run(svc.engine, [Q._request(1000 * r + depth, max(depth, Q.SHORT_PROMPT), gen_len)])[0]
            rates.append(done.usage.completion_tok_per_sec or 0.0)
        out[depth] = {"tok_per_s": max(rates), "samples": rates}
        print(f"  ours {qtype} depth {depth}: {max(rates):.2f} tok/s", flush=True)
    return out


def llama(llama_dir: Path, model: Path, depths: list[int], gen_len: int, reps: int, threads: int) -> dict[int, dict]:
    cmd = [str(Q.llama_bin(llama_dir, "llama-bench")), "-m", str(model), "-t", str(threads), "-p", "0",
           "-n", str(gen_len), "-d", ",".join(map(str, depths)), "-r", str(reps), "-o", "json"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = {}
    for row in json.loads(res.stdout):
        out[int(row["n_depth"])] = {"tok_per_s": max(row["samples_ts"]), "samples": row["samples_ts"],
                                    "command": " ".join(cmd[1:])}
        print(f"  llama.cpp depth {row['n_depth']}: {max(row['samples_ts']):.2f} tok/s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="q4_0", choices=Q.TYPES)
    ap.add_argument("--depths", default="0,2048,4000")
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.environ.get("QUANT_SPEED_CACHE",
                                                         str(Path(tempfile.gettempdir()) / "mistralrs-quant-speed")))
    ap.add_argument("--out", default="benchmarks/results/long_context_decode.json")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    model_dir = Path(tempfile.mkdtemp(prefix="mistralrs-long-ctx-"))
    Q.write_model_dir(model_dir)
    result: dict = {"benchmark": "long_context_decode", "date": time.strftime("%Y-%m-%d"), "type": args.type,
                    "gen_len": args.gen_len, "threads": args.threads, "machine": Q.machine_info()}
    result["ours"] = ours(args.type, depths, args.gen_len, args.reps, model_dir)
    llama_dir = os.environ.get("LLAMA_CPP_DIR")
    if llama_dir:
        ggufs = Q.make_ggufs(Path(llama_dir), Path(args.cache_dir), [args.type], args.threads)
        result["llama_cpp"] = llama(Path(llama_dir), ggufs[args.type], depths, args.gen_len, args.reps, args.threads)
    print(f"\n{'depth':>6} {'ours':>8} {'llama.cpp':>10} {'ratio':>7}")
    for d in depths:
        o = result["ours"][d]["tok_per_s"]
        ll = result.get("llama_cpp", {}).get(d, {}).get("tok_per_s")
        print(f"{d:6d} {o:8.2f} {ll if ll is None else f'{ll:10.2f}'} {'' if not ll else f'{o / ll:7.2f}'}")
        if ll:
            result.setdefault("ratio", {})[d] = o / ll
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
