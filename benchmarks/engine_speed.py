"""Engine speed on a dummy-weight Llama of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocab 128256) — or any shape given on the command line.

Reports prefill tok/s (512-token prompt), batch-1 decode tok/s and achieved GB/s (weight bytes
read per token), aggregate decode tok/s with 16 concurrent requests, and the Python overhead per
decode step (time outside the model forward). Prints a table and writes JSON.

Decode rates count the tokens after each request's first one over the time after its first one
(``Usage.completion_tok_per_sec``): for the 16 concurrent requests, whose prompts are prefilled
together in one step, that is the decode window from the step that gives all of them their first
token to the end. The same run's end-to-end rate (all completion tokens over the wall time,
prefill included) is reported beside it.

    python benchmarks/engine_speed.py [--dtype bf16] [--threads 2] [--out benchmarks/results/engine_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    ap.add_argument("--out", default="benchmarks/results/engine_speed.json")
    args = ap.parse_args()

    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does; before torch allocates
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mistralrs import protocol as P
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams
    from mistralrs.serving import ModelService, ServiceOptions

    config = dict(LLAMA_3_2_1B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "config.json").write_text(json.dumps(config))
        # The demo tokenizer is enough: the benchmark feeds token ids directly.
        from mistralrs.demo import demo_model_dir

        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / name).write_bytes((demo_model_dir() / name).read_bytes())
        svc = ModelService(ServiceOptions(
            model_id=str(model_dir), dtype=args.dtype, dummy_weights=True, max_seqs=args.concurrency,
            pa_context_len=(args.prompt_len + args.gen_len + 64) * (args.concurrency + 1),
        ))
    engine = svc.engine
    weight_bytes = svc.loaded.weight_bytes
    greedy = SamplingParams(temperature=0)
    vocab = config["vocab_size"]

    def prompt(seed: int, n: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1000, vocab - 1000, (n,), generator=g).tolist()

    def run(reqs: list[GenerationRequest]) -> list:
        handles = [engine.submit(r) for r in reqs]
        return [P.collect(h)[0] for h in handles]

    # Instrument the model forward to split Python overhead from model time.
    forward = svc.loaded.model.forward
    forward_times: list[float] = []

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        forward_times.append(time.perf_counter() - t)
        return out

    svc.loaded.model.forward = timed_forward
    logits_fn = svc.loaded.model.compute_logits

    def timed_logits(*a, **k):
        t = time.perf_counter()
        out = logits_fn(*a, **k)
        forward_times[-1] += time.perf_counter() - t  # model time = forward + lm_head
        return out

    svc.loaded.model.compute_logits = timed_logits

    # Warm-up.
    run([GenerationRequest(prompt_ids=prompt(0, 64), sampling=greedy, max_tokens=4, ignore_eos=True)])

    # Prefill: a 512-token prompt, 1 output token (prefix cache off by distinct prompts).
    prefill = []
    for i in range(2):
        t = time.perf_counter()
        run([GenerationRequest(prompt_ids=prompt(100 + i, args.prompt_len), sampling=greedy, max_tokens=1,
                               ignore_eos=True)])
        prefill.append(args.prompt_len / (time.perf_counter() - t))

    # Batch-1 decode.
    forward_times.clear()
    steps_before = engine.stats["steps"]
    t = time.perf_counter()
    done = run([GenerationRequest(prompt_ids=prompt(200, 16), sampling=greedy, max_tokens=args.gen_len,
                                  ignore_eos=True)])[0]
    total = time.perf_counter() - t
    decode_tps = done.usage.completion_tok_per_sec or 0.0
    steps = engine.stats["steps"] - steps_before
    decode_forward = forward_times[1:]  # skip the prefill step
    step_time = (done.usage.completion_seconds or total) / max(1, args.gen_len - 1)
    overhead = max(0.0, step_time - statistics.mean(decode_forward)) if decode_forward else 0.0

    # Aggregate decode with N concurrent requests.
    reqs = [GenerationRequest(prompt_ids=prompt(300 + i, 16), sampling=greedy, max_tokens=args.gen_len,
                              ignore_eos=True) for i in range(args.concurrency)]
    t = time.perf_counter()
    results = run(reqs)
    agg_time = time.perf_counter() - t
    agg_tokens = sum(r.usage.completion_tokens for r in results)
    # Decode window: from the last first token to the last token (all prompts share one prefill step).
    first = max(r.usage.time_to_first_token or 0.0 for r in results)
    last = max(r.usage.total_seconds for r in results)
    agg_decode_tps = sum(r.usage.completion_tokens - 1 for r in results) / (last - first)
    svc.shutdown()

    out = {
        "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size")},
        "dtype": str(svc.loaded.dtype).removeprefix("torch."),
        "threads": args.threads,
        "attention_backend": svc.backend.name,
        "weight_bytes": weight_bytes,
        "prefill_tok_per_s": max(prefill),
        "decode_tok_per_s": decode_tps,
        "decode_gb_per_s": decode_tps * weight_bytes / 1e9,
        "decode_steps": steps,
        "aggregate_decode_tok_per_s": agg_decode_tps,
        "aggregate_vs_batch1": agg_decode_tps / decode_tps if decode_tps else None,
        "aggregate_end_to_end_tok_per_s": agg_tokens / agg_time,
        "concurrency": args.concurrency,
        "python_overhead_ms_per_step": overhead * 1e3,
        "python_overhead_share": overhead / step_time if step_time else None,
    }
    print(f"{'prefill tok/s':32}{out['prefill_tok_per_s']:10.1f}")
    print(f"{'decode tok/s (batch 1)':32}{out['decode_tok_per_s']:10.2f}   {out['decode_gb_per_s']:.1f} GB/s")
    print(f"{'aggregate decode tok/s (x' + str(args.concurrency) + ')':32}{out['aggregate_decode_tok_per_s']:10.2f}"
          f"   {out['aggregate_vs_batch1']:.1f}x batch 1")
    print(f"{'  end to end, prefill included':32}{out['aggregate_end_to_end_tok_per_s']:10.2f}")
    print(f"{'python overhead per step':32}{out['python_overhead_ms_per_step']:10.2f} ms"
          f"   {100 * out['python_overhead_share']:.1f}% of the step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
