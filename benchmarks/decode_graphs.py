"""Decode steps replayed as CPU decode graphs (`engine.op_replay`) against the same steps run eagerly.

The model is quant_speed.py's dummy-weight Llama of Llama-3.2-1B's shape, quantized at load (``--isq``,
default q4k; ``bf16`` for none). For each batch size a decode step of that many sequences (each at
``--context`` tokens of KV) is built once and captured; then the eager forward (the engine's
``ModelRunner.execute`` without graphs) and the replay run on the same inputs, alternating, ``--reps``
times each. Alternating in one run is what makes the ratio trustworthy on machines whose speed drifts by
tens of percent from one minute to the next. Prints ms per step for both, the ratio, and the capture time;
writes JSON.

    python benchmarks/decode_graphs.py [--isq q4k] [--sizes 1,4,16] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def step_inputs(sizes_blocks: list[list[int]], context: int, block_size: int):  # type: ignore[no-untyped-def]
    """A decode step: sequence i has `context` tokens of KV and one new token, in the blocks given."""
    import torch

    from mistralrs.engine.runner import StepInputs

    n = len(sizes_blocks)
    tables = torch.tensor(sizes_blocks, dtype=torch.long)
    pos = torch.full((n,), context, dtype=torch.long)
    slots = tables[:, context // block_size] * block_size + context % block_size
    return StepInputs(ids=torch.arange(1, n + 1), positions=pos, query_start_loc=list(range(n + 1)),
                      seq_lens=[context + 1] * n, sample_rows=list(range(n)), sampling=list(range(n)),
                      slot_mapping=slots, block_tables=tables)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isq", default="q4k")
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/decode_graphs.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import quant_speed as qs

    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(qs.CONFIG))
    from mistralrs.demo import demo_model_dir

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((demo_model_dir() / name).read_bytes())
    opts = argparse.Namespace(prompt_len=args.context, gen_len=8, concurrency=max(sizes))
    svc = qs.open_ours(args.isq, opts, model_dir)
    rows = []
    try:
        engine = svc.engine
        graphs, runner = engine.runner.graphs, engine.runner
        if graphs is None:
            print(f"decode graphs are off here: {engine.graphs_off}")
            return 1
        bs = svc.backend.block_size
        per_seq = args.context // bs + 1
        for size in sizes:
            blocks = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(size)]
            inputs = step_inputs(blocks, args.context, bs)
            t = time.perf_counter()
            with torch.inference_mode():
                cap = graphs._capture(size, inputs)
            capture_s = time.perf_counter() - t
            if cap is None:
                print(f"capture failed: {graphs.disabled}")
                return 1
            times: dict[str, list[float]] = {"eager": [], "graph": []}
            for rep in range(args.reps):
                order = ("eager", "graph") if rep % 2 == 0 else ("graph", "eager")
                for kind in order:
                    runner.graphs = graphs if kind == "graph" else None
                    t = time.perf_counter()
                    logits, _ = runner.execute(inputs)
                    times[kind].append(time.perf_counter() - t)
            runner.graphs = graphs
            eager, graph = (sum(times[k]) / len(times[k]) * 1e3 for k in ("eager", "graph"))
            row = {"batch": size, "eager_ms": round(eager, 2), "graph_ms": round(graph, 2),
                   "speedup": round(eager / graph, 3), "capture_s": round(capture_s, 3)}
            rows.append(row)
            print(f"isq {args.isq:5} batch {size:3}: eager {eager:7.2f} ms  graph {graph:7.2f} ms  "
                  f"speedup {eager / graph:.3f}x  (capture {capture_s:.2f} s)", flush=True)
    finally:
        svc.shutdown()
    out = {"benchmark": "decode_graphs", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "threads": args.threads, "isq": args.isq,
           "context": args.context, "reps": args.reps, "loadavg": os.getloadavg(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
