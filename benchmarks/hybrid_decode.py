"""Decode speed and cache size of a Mamba-2 hybrid (Granite 4.0): paged K/V for its attention
layers plus the per-sequence recurrent state for its Mamba-2 layers, vs a plain GQA cache of the
same model (K/V in every layer), on a dummy-weight model with Granite-4.0-H-Tiny's per-layer
shapes (hidden 1536, 12 query / 4 KV heads of 128, Mamba-2 with 48 heads of 64, d_state 128,
one group, conv 4, experts of 512 top-6 plus the shared MLP of 1024) scaled down in depth,
expert count and vocabulary so it runs on a small CPU box. The depth keeps H-Tiny's
attention:Mamba ratio (4 of 40 layers are attention: 1 of every 10, at the same offset).

For each batch size: prefill `--context` tokens per sequence through the paged backend (the
chunked SSD scan, the state left in the sequence's slot), then time `--steps` batched decode
steps (each Mamba layer one recurrent step over the batch; tokens/s = batch * steps / time).
Cache bytes: the backend's paged K/V per token (``bytes_per_block / block_size``), the state
per sequence (``RecurrentStateCache``), their sum per token at the benchmark's context and at
longer ones, and the plain GQA figure (every layer attention) of the same model; the full-depth
figures for the real H-Tiny (40 layers) are printed beside them (`hybrid_cache_bytes.py` has
those from the config alone).

    python benchmarks/hybrid_decode.py [--threads 2] [--dtype bf16] [--out benchmarks/results/hybrid_decode.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid_cache_bytes import GRANITE_4_H_TINY  # noqa: E402

H_TINY_LAYERS = 40
CONTEXTS = (1024, 4096, 32768)


def run(path: Path, *, dtype: str, batch: int, context: int, steps: int) -> dict:
    import torch

    from mistralrs.attention import kv_elements_per_token
    from mistralrs.loading import build_attention_backend, load_model

    loaded = load_model(path, dtype=dtype, dummy_weights=True)
    model = loaded.model
    bs = 32
    per_seq = -(-(context + steps + 1) // bs)
    backend = build_attention_backend(loaded, name="paged", num_blocks=batch * per_seq, block_size=bs,
                                      num_state_slots=batch)
    assert backend.states is not None, "the backend kept no recurrent state"
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    state_slots = torch.arange(batch, dtype=torch.int64)
    vocab = int(loaded.config["vocab_size"])
    g = torch.Generator().manual_seed(0)

    def slots(i: int, positions: range) -> list[int]:
        return [int(tables[i, p // bs]) * bs + p % bs for p in positions]

    with torch.no_grad():
        t0 = time.perf_counter()
        for i in range(batch):  # prefill one sequence at a time, from a zero state
            ids = torch.randint(0, vocab, (context,), generator=g)
            b = backend.batch([0, context], [context], slot_mapping=torch.tensor(slots(i, range(context))),
                              block_tables=tables[i:i + 1], state_slots=state_slots[i:i + 1])
            model(ids, torch.arange(context), b)
        prefill_s = time.perf_counter() - t0
        last = torch.randint(0, vocab, (batch,), generator=g)
        times = []
        for step in range(steps + 1):
            pos = context + step
            b = backend.batch(list(range(batch + 1)), [pos + 1] * batch,
                              slot_mapping=torch.tensor([slots(i, range(pos, pos + 1))[0] for i in range(batch)]),
                              block_tables=tables, state_slots=state_slots)
            t0 = time.perf_counter()
            last = model.compute_logits(model(last, torch.full((batch,), pos), b)).argmax(-1)
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
    kv = model.kv_cache_shape()
    itemsize = backend.bytes_per_block() // bs // kv_elements_per_token(kv)
    num_layers = len(model.model.layers)
    return {
        "batch": batch,
        "context": context,
        "prefill_tok_s": round(batch * context / prefill_s, 2),
        "decode_tok_s": round(batch * len(times) / sum(times), 2),
        "kv_bytes_per_token": backend.bytes_per_block() // bs,
        "state_bytes_per_sequence": backend.states.shape.bytes_per_sequence(),
        "gqa_bytes_per_token": kv_elements_per_token({**kv, "num_layers": num_layers}) * itemsize,
        "attention_layers": kv["num_layers"],
        "mamba_layers": backend.states.shape.num_layers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layers", type=int, default=10, help="a multiple of 10 keeps H-Tiny's 1:9 attention:Mamba")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--note", default="", help="stored in the JSON (e.g. 'machine under load')")
    ap.add_argument("--out", default="benchmarks/results/hybrid_decode.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # H-Tiny's attention layers sit at 5, 15, 25, 35: the same offset in every group of 10
    layer_types = ["attention" if i % 10 == 5 else "mamba" for i in range(args.layers)]
    if "attention" not in layer_types:
        ap.error("--layers must be at least 6 so one layer is attention")
    config = dict(GRANITE_4_H_TINY, num_hidden_layers=args.layers, num_local_experts=args.experts,
                  vocab_size=args.vocab, layer_types=layer_types)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "config.json").write_text(json.dumps(config))
        for batch in (int(b) for b in args.batches.split(",")):
            row = run(path, dtype=args.dtype, batch=batch, context=args.context, steps=args.steps)
            scale = H_TINY_LAYERS // args.layers
            row["h_tiny_40_layers"] = {
                "kv_bytes_per_token": row["kv_bytes_per_token"] * scale,
                "state_bytes_per_sequence": row["state_bytes_per_sequence"] * scale,
                "gqa_bytes_per_token": row["gqa_bytes_per_token"] * scale,
            }
            row["per_context"] = [
                {"context": n, "hybrid_bytes_per_token": round(row["kv_bytes_per_token"]
                                                               + row["state_bytes_per_sequence"] / n, 1),
                 "hybrid_over_gqa": round((row["kv_bytes_per_token"] + row["state_bytes_per_sequence"] / n)
                                          / row["gqa_bytes_per_token"], 4)}
                for n in (args.context, *CONTEXTS)]
            rows.append(row)
            here = row["per_context"][0]
            print(f"batch {batch:>2}  ctx {args.context}: decode {row['decode_tok_s']:8.2f} tok/s, "
                  f"prefill {row['prefill_tok_s']:8.2f} tok/s   cache: K/V {row['kv_bytes_per_token']} B/token + "
                  f"state {row['state_bytes_per_sequence'] / 2**20:.2f} MiB/seq = {here['hybrid_bytes_per_token']} "
                  f"B/token at ctx {args.context} vs plain GQA {row['gqa_bytes_per_token']} B/token "
                  f"({here['hybrid_over_gqa']:.3f}x)")
    out = {"benchmark": "hybrid_decode", "model": "Granite-4.0-H-Tiny per-layer shapes, dummy weights",
           "dtype": args.dtype, "threads": args.threads, "layers": args.layers,
           "layer_types": layer_types, "experts": args.experts, "experts_per_tok": GRANITE_4_H_TINY["num_experts_per_tok"],
           "vocab": args.vocab, "steps": args.steps, "note": args.note, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
