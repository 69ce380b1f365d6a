"""Time `Sampler.sample` for a decode step: S=16 rows, V=128256 (Llama 3 vocabulary).

Scenarios (each row keeps its own SequenceSamplingState with a 512-token prompt and a
growing output, so penalties see real histories):

* mixed_peaked   - mixed parameters (greedy, plain temperature, Qwen-style top-k/top-p,
                   Llama-style top-p, min-p + repetition/frequency/DRY penalties, logprobs)
                   on peaked logits, like a trained model's (a few likely tokens);
* mixed_diffuse  - the same parameters on N(0, 1) logits: the top-p nucleus spans most of
                   the vocabulary (worst case: full sort for top-p-only rows);
* all_greedy, all_temperature, all_top_k_top_p - homogeneous batches.

Usage: python benchmarks/sampling.py [--iters N] [--threads T]
Prints ms per call and writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))

from mistralrs.engine.sampling import Sampler, SamplingParams, SequenceSamplingState  # noqa: E402

S, V = 16, 128256

MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
    SamplingParams(temperature=0.0, repetition_penalty=1.1),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.0, logprobs=True),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=1),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    SamplingParams(temperature=0.6, top_k=50, top_p=0.95),
    SamplingParams(temperature=0.6, top_p=0.9),
    SamplingParams(temperature=0.6, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, min_p=0.1, frequency_penalty=0.2, presence_penalty=0.1),
    SamplingParams(temperature=0.8, top_p=0.95, dry_multiplier=0.8, logit_bias={128001: -100.0}),
    SamplingParams(temperature=1.0, top_k=40, repetition_penalty=1.2, frequency_penalty=0.3),
]

SCENARIOS = {
    "mixed_peaked": (MIXED, "peaked"),
    "mixed_diffuse": (MIXED, "diffuse"),
    "all_greedy": ([SamplingParams(temperature=0.0)] * S, "peaked"),
    "all_temperature": ([SamplingParams(temperature=0.8)] * S, "peaked"),
    "all_top_k_top_p": ([SamplingParams(temperature=0.7, top_k=20, top_p=0.8)] * S, "peaked"),
}


def make_logits(kind: str, g: torch.Generator) -> torch.Tensor:
    logits = torch.randn(S, V, generator=g)
    if kind == "peaked":
        # A trained model's logits: a broad background plus a handful of strong candidates.
        logits *= 2.0
        hot = torch.randint(0, V, (S, 8), generator=g)
        boost = 12.0 + 4.0 * torch.rand(S, 8, generator=g)
        logits.scatter_add_(1, hot, boost)
    return logits


def run(params: list[SamplingParams], kind: str, iters: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (512,), generator=g).tolist()
    states = [SequenceSamplingState(prompt, seed=p.seed, fallback_seed=i) for i, p in enumerate(params)]
    for s in states:  # some output history for the penalties
        s.extend(torch.randint(0, 2000, (200,), generator=g).tolist())
    sampler = Sampler()
    batches = [make_logits(kind, g) for _ in range(4)]
    for i in range(3):  # warm-up
        sampler.sample(batches[i % 4], params, states)
    times = []
    for i in range(iters):
        logits = batches[i % 4]
        t0 = time.perf_counter()
        out = sampler.sample(logits, params, states)
        times.append((time.perf_counter() - t0) * 1e3)
        for s, t in zip(states, out.token_ids):
            s.append(t)
    times.sort()
    return {
        "ms_median": round(statistics.median(times), 3),
        "ms_mean": round(statistics.fmean(times), 3),
        "ms_min": round(times[0], 3),
        "ms_p90": round(times[int(0.9 * (len(times) - 1))], 3),
        "iters": iters,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name, (params, kind) in SCENARIOS.items():
        results[name] = run(params, kind, args.iters)
        r = results[name]
        print(
            f"{name:18s} S={S} V={V}: {r['ms_median']:8.2f} ms/call (median; min {r['ms_min']:.2f}, p90 {r['ms_p90']:.2f})"
        )
    payload = {
        "benchmark": "Sampler.sample",
        "S": S,
        "V": V,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "scenarios": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
