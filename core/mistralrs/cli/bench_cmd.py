"""`mistralrs bench [auto|text] -m MODEL [model options]`: prefill and decode speed through the engine.

Like mistral.rs's `bench`: the model is loaded with the usual model options (one running
sequence, prefix caching off), `--warmup` short requests are discarded, then each of
`--iterations` rounds runs

- a prefill test per `--prompt-len` value (a comma list sweeps): a prompt of that many token
  ids and one generated token. T/s = prompt tokens / prompt time; latency = TTFT in ms.
- a decode test per `--depth` value (a comma list sweeps): a `depth`-token prompt then
  `--gen-len` tokens with EOS ignored. T/s = (generated - 1) / decode time; latency = ms/token.

`--prompt-len 0` skips the prefill test, `--gen-len` below 2 skips the decode test.
Results are the mean ± population standard deviation over the iterations.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from mistralrs.cli.model_options import add_model_arguments


def _int_list(minimum: int, what: str):
    def parse(text: str) -> list[int]:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
            values.append(value)
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, runtime=False)
    b = parser.add_argument_group("benchmark")
    b.add_argument("--prompt-len", type=_int_list(0, "integers >= 0 (comma-separated)"), default=[512],
                   help="prompt tokens of the prefill test; a comma list sweeps; 0 skips it (default 512)")
    b.add_argument("--gen-len", type=_count(0), default=128,
                   help="tokens generated in the decode test; below 2 skips it (default 128)")
    b.add_argument("--depth", type=_int_list(1, "integers >= 1 (comma-separated)"), default=[4],
                   help="prompt tokens before the decode test (context depth); a comma list sweeps (default 4)")
    b.add_argument("--iterations", type=_count(1), default=3, help="measured iterations (default 3)")
    b.add_argument("--warmup", type=_count(0), default=1, help="warm-up runs, discarded (default 1)")
    b.add_argument("--seed", type=int, help="seed for the random prompt tokens and weights")
    b.add_argument("--json", action="store_true", help="print the results as JSON")


def stats(values: list[float]) -> tuple[float, float]:
    """(mean, population standard deviation), as mistral.rs computes them."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def run(args: argparse.Namespace) -> int:
    from mistralrs.cli.model_options import options_from_args
    from mistralrs.errors import ConfigError

    prompt_lens = [p for p in args.prompt_len if p > 0]
    decode = args.gen_len >= 2
    if not prompt_lens and not decode:
        raise ConfigError("nothing to benchmark: --prompt-len is 0 and --gen-len is below 2")
    opts = options_from_args(args)
    opts.max_seqs = 1
    opts.prefix_cache_n = 0  # every prompt is prefilled for real
    longest = max(prompt_lens + ([max(args.depth) + args.gen_len] if decode else []))
    if opts.pa_context_len is None and opts.pa_memory_mb is None and opts.pa_memory_fraction is None:
        opts.pa_context_len = longest + 64
    if opts.max_seq_len is not None and longest > opts.max_seq_len:
        raise ConfigError(f"the longest test needs {longest} tokens but --max-seq-len is {opts.max_seq_len}")

    import torch

    from mistralrs import protocol as P
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams
    from mistralrs.nn.linear import describe_methods
    from mistralrs.serving import ModelService

    if args.seed is not None:
        opts.seed = args.seed
    svc = ModelService(opts)
    try:
        if longest > svc.max_model_len:
            raise ConfigError(f"the longest test needs {longest} tokens but {args.model_id} has a context of "
                              f"{svc.max_model_len}; lower --prompt-len / --gen-len / --depth")
        vocab = int(svc.loaded.config.get("vocab_size") or getattr(svc.tokenizer, "vocab_size", None) or 1000)
        low, high = min(vocab // 8, 1000), vocab - 1
        generator = torch.Generator().manual_seed(args.seed or 0)
        greedy = SamplingParams(temperature=0)

        def one(n_prompt: int, n_gen: int) -> Any:
            ids = torch.randint(low, high, (n_prompt,), generator=generator).tolist()
            request = GenerationRequest(prompt_ids=ids, sampling=greedy, max_tokens=n_gen, ignore_eos=True)
            done, _ = P.collect(svc.engine.submit(request))
            return done.usage

        for _ in range(args.warmup):
            one(min(32, svc.max_model_len - 16), 16)

        prefill: dict[int, list[tuple[float, float]]] = {n: [] for n in prompt_lens}
        decodes: dict[int, list[float]] = {d: [] for d in args.depth} if decode else {}
        for i in range(args.iterations):
            print(f"iteration {i + 1}/{args.iterations}...", file=sys.stderr, flush=True)
            for n in prompt_lens:
                usage = one(n, 1)
                seconds = usage.prompt_seconds or usage.time_to_first_token or usage.total_seconds
                ttft = usage.time_to_first_token if usage.time_to_first_token is not None else seconds
                prefill[n].append(((usage.prompt_tokens - usage.cached_tokens) / seconds if seconds else 0.0,
                                   (ttft or 0.0) * 1e3))
            for depth in decodes:
                usage = one(depth, args.gen_len)
                decodes[depth].append(usage.completion_tok_per_sec or 0.0)
        results: list[dict[str, Any]] = []
        for n, samples in prefill.items():
            tps, sd = stats([s[0] for s in samples])
            ttft, _ = stats([s[1] for s in samples])
            results.append({"test": "prefill", "name": f"Prefill ({n} tokens)", "prompt_len": n,
                            "tok_per_sec": tps, "std_dev": sd, "ttft_ms": ttft,
                            "samples_tok_per_sec": [s[0] for s in samples]})
        for depth, rates in decodes.items():
            tps, sd = stats(rates)
            name = f"Decode ({args.gen_len} tokens" + (f" @ d{depth})" if len(decodes) > 1 else ")")
            results.append({"test": "decode", "name": name, "gen_len": args.gen_len, "depth": depth,
                            "tok_per_sec": tps, "std_dev": sd, "ms_per_token": 1e3 / tps if tps else None,
                            "samples_tok_per_sec": rates})
        report = {
            "model": args.model_id,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "device": str(svc.device),
            "dtype": str(svc.loaded.dtype).removeprefix("torch."),
            "attention_backend": svc.backend.name,
            "weight_bytes": svc.loaded.weight_bytes,
            "linear_methods": describe_methods(svc.loaded.model),
            "threads": torch.get_num_threads(),
            "results": results,
        }
    finally:
        svc.shutdown()

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from mistralrs.cli._table import render_table

    rows = []
    for r in results:
        latency = (f"{r['ttft_ms']:.2f} ms (TTFT)" if r["test"] == "prefill"
                   else f"{r['ms_per_token']:.2f} ms/T" if r["ms_per_token"] else "-")
        rows.append([r["name"], f"{r['tok_per_sec']:.1f} ± {r['std_dev']:.1f}", latency])
    print()
    print("Benchmark Results")
    print("=================")
    print()
    print(f"Model: {args.model_id}")
    methods = report["linear_methods"]
    print("Weights: " + ", ".join(f"{n} x {m}" for m, n in sorted(methods.items(), key=lambda kv: -kv[1])))
    print(f"Iterations: {args.iterations}")
    print(f"Device: {report['device']} ({report['dtype']}, {report['attention_backend']} attention, "
          f"{report['threads']} threads)")
    print()
    print(render_table(["Test", "T/s", "Latency"], rows))
    print()
    return 0
