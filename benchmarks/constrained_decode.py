"""Decode slowdown from grammar constraints: 16 concurrent requests, unconstrained vs each with
its own JSON-schema constraint, on a dummy-weight Llama (Llama-3.2-1B's shape, 4 layers by
default so the run is short). Prints aggregate tok/s for both and the slowdown; writes JSON.

    python benchmarks/constrained_decode.py [--layers 4] [--out benchmarks/results/constrained_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 400},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 40},
        "score": {"type": "number"},
    },
    "required": ["name", "tags", "score"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/constrained_decode.json")
    args = ap.parse_args()
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    torch.set_num_threads(2)
    from engine_speed import LLAMA_3_2_1B

    from mistralrs import protocol as P
    from mistralrs.demo import demo_model_dir
    from mistralrs.engine.constraints import GrammarSpec
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams
    from mistralrs.serving import ModelService, ServiceOptions

    config = {**LLAMA_3_2_1B, "num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(config))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (d / name).write_bytes((demo_model_dir() / name).read_bytes())
        svc = ModelService(ServiceOptions(model_id=str(d), dtype="bf16", dummy_weights=True,
                                          max_seqs=args.concurrency, pa_context_len=8192))
    prompt = svc.tokenizer.encode("Describe a product as JSON:")
    grammar = GrammarSpec("json_schema", SCHEMA)

    def run(constrained: bool) -> float:
        reqs = [GenerationRequest(prompt_ids=prompt, max_tokens=args.gen_len, ignore_eos=True,
                                  sampling=SamplingParams(temperature=1.0, seed=i),
                                  grammar=grammar if constrained else None)
                for i in range(args.concurrency)]
        t = time.perf_counter()
        done = [P.collect(svc.engine.submit(r))[0] for r in reqs]
        return sum(d.usage.completion_tokens for d in done) / (time.perf_counter() - t)

    run(False)
    run(True)  # warm-up: builds the token trie and compiles the schema once
    plain, constrained = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        plain.append(run(False))
        constrained.append(run(True))
    svc.shutdown()
    best_plain, best_constrained = max(plain), max(constrained)
    out = {
        "layers": args.layers, "concurrency": args.concurrency, "gen_len": args.gen_len,
        "unconstrained_tok_per_s": best_plain, "constrained_tok_per_s": best_constrained,
        "slowdown": 1 - best_constrained / best_plain,
    }
    print(f"unconstrained  {best_plain:8.1f} tok/s")
    print(f"constrained    {best_constrained:8.1f} tok/s   slowdown {100 * out['slowdown']:.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
