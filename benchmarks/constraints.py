"""Time `batch_masks` (structured-output masks) for a decode step: 16 sequences, each
constrained by a JSON schema, at a realistic vocabulary size.

The tokenizer is a Qwen2-style byte-level BPE (NFC, Qwen split regex, byte-level) trained
offline with `tokenizers` on this machine's Python standard library sources plus generated
JSON documents (default 32k tokens; `--vocab`), cached under the temp directory. The logits
width is padded to a multiple of 128 above the tokenizer vocabulary, like real checkpoints.

Each step: `batch_masks` for the 16 states (the timed part), then one token per row drawn
uniformly from its allowed set (the worst case for llguidance: the walk spends most steps
inside free-form strings, numbers and whitespace), then `advance`. A state that finishes is
replaced by a fresh one, so the batch always holds 16 sequences at mixed grammar positions.
Methods: `batch_masks` with llguidance's `LLExecutor` (parallel, the default with several
CPUs), `batch_masks(parallel=False)` (rows filled one by one into the shared bitmask), and
`ConstraintState.fill_mask` row by row; plus the int32 -> bool expansion alone. Timings on a
shared machine are noisy: read the p50.

Usage: python benchmarks/constraints.py [--steps N] [--vocab V] [--seqs S]
Prints ms per step and writes benchmarks/results/constraints.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))
sys.path.insert(0, str(ROOT))

from mistralrs.engine import constraint_masks  # noqa: E402
from mistralrs.engine import constraints as C  # noqa: E402
from mistralrs.engine.bitmask import rows_from_bitmask  # noqa: E402
from mistralrs.tokenization import Tokenizer  # noqa: E402

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "role", "address", "active"],
    "additionalProperties": False,
}


def _bounded(schema):
    """The same schema with short strings and arrays, so that uniform random walks leave
    free-form strings quickly and spend their steps on keys, numbers, enums and separators
    (the positions where llguidance's masks cost the most), finishing and restarting often."""
    if isinstance(schema, dict):
        out = {k: _bounded(v) for k, v in schema.items()}
        if out.get("type") == "string" and "pattern" not in out and "format" not in out:
            out["maxLength"] = 6
        if out.get("type") == "array":
            out["maxItems"] = 2
        return out
    return schema


SCENARIOS = {
    "free_strings": SCHEMA,  # uniform walks spend most steps inside unbounded strings
    "structural": _bounded(SCHEMA),
}

WORDS = (
    "alpha beta gamma delta user admin name city street score value data model token request "
    "response stream batch engine cache layer weight tensor matrix vector paris london berlin "
    "tokyo madrid rome lisbon vienna prague dublin oslo quick brown fox lazy dog hello world"
).split()


def _generated_json(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        doc = {
            "id": i,
            "name": " ".join(rng.choice(WORDS).title() for _ in range(2)),
            "email": f"{rng.choice(WORDS)}.{rng.choice(WORDS)}@example.com",
            "role": rng.choice(["admin", "editor", "viewer"]),
            "score": round(rng.uniform(0, 100), 2),
            "tags": rng.sample(WORDS, rng.randint(0, 4)),
            "address": {"street": f"{rng.randint(1, 999)} {rng.choice(WORDS).title()} St", "city": rng.choice(WORDS)},
            "active": rng.random() < 0.5,
        }
        docs.append(json.dumps(doc, indent=rng.choice([None, 2])))
    return docs


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for f in sorted(stdlib.rglob("*.py")):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts + _generated_json(20000)


def build_tokenizer(vocab: int) -> Path:
    """A byte-level BPE tokenizer directory with `vocab` tokens (cached)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    directory = Path(tempfile.gettempdir()) / f"mistralrs-bench-tokenizer-{vocab}"
    if (directory / "tokenizer.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    tok = Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(_corpus(), trainer=trainer)
    print(f"trained a {tok.get_vocab_size()}-token BPE in {time.perf_counter() - t0:.1f} s", flush=True)
    (directory / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": specials[1:]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary(ms: list[float]) -> dict[str, float]:
    return {
        "mean_ms": round(statistics.fmean(ms), 3),
        "p50_ms": round(_pct(ms, 0.5), 3),
        "p95_ms": round(_pct(ms, 0.95), 3),
        "max_ms": round(max(ms), 3),
    }


METHODS = ("batch_masks_sequential", "batch_masks_parallel", "fill_mask_per_row")


def run(factory: C.ConstraintFactory, spec: C.GrammarSpec, seqs: int, steps: int) -> dict:
    """Drive `seqs` random walks for `steps` steps, timing each method's mask computation.

    Every method has its own freshly compiled grammar and states (llguidance caches lexer
    states per compiled grammar, so sharing one would favour whichever method runs second);
    the methods run interleaved, step by step, on the same walk (the masks are identical, so
    one token draw per row serves all of them) and so see the same machine load."""
    V = factory.vocab_size
    rng = torch.Generator().manual_seed(0)
    compiled = {m: factory._compile(spec) for m in METHODS}  # bypass the LRU: cold grammars
    states = {m: [factory.new_state(compiled[m]) for _ in range(seqs)] for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    expand: list[float] = []
    restarts = 0
    allowed_counts: list[int] = []
    for _ in range(steps):
        masks = {}
        for m in METHODS:
            t0 = time.perf_counter()
            if m == "fill_mask_per_row":
                mask = torch.empty(seqs, V, dtype=torch.bool)
                for i, st in enumerate(states[m]):
                    st.fill_mask(mask[i])
            else:
                mask = C.batch_masks(states[m], V, parallel=m == "batch_masks_parallel")
            times[m].append((time.perf_counter() - t0) * 1e3)
            masks[m] = mask
        ref = masks[METHODS[0]]
        assert all(torch.equal(ref, x) for x in masks.values())
        bitmask = torch.empty(seqs, factory.mask_words, dtype=torch.int32)  # expansion alone
        for k, st in enumerate(states[METHODS[0]]):
            st.fill_bitmask(bitmask[k])
        t0 = time.perf_counter()
        rows_from_bitmask(bitmask, factory, V)
        expand.append((time.perf_counter() - t0) * 1e3)
        allowed_counts.extend(ref.sum(dim=1).tolist())
        toks = torch.multinomial(ref.float(), 1, generator=rng).flatten().tolist()
        for i, tok in enumerate(toks):
            restart = tok in factory.eos_token_ids
            for m in METHODS:
                st = states[m][i]
                if not restart:
                    st.advance(tok)
                if restart or st.is_finished():
                    states[m][i] = factory.new_state(compiled[m])
            restarts += restart or states[METHODS[0]][i].num_consumed == 0
    return {
        **{m: _summary(t) for m, t in times.items()},
        "expand_to_bool": _summary(expand),
        "finished_and_restarted": int(restarts),
        "median_allowed_tokens_per_row": int(_pct(allowed_counts, 0.5)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="llguidance executor threads (default: all CPUs)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "constraints.json")
    args = ap.parse_args()
    if args.threads:
        os.environ["MISTRALRS_GRAMMAR_THREADS"] = str(args.threads)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    tok = Tokenizer.from_dir(build_tokenizer(args.vocab))
    V = ((tok.vocab_size + 127) // 128) * 128 + 128  # padded logits width, like real checkpoints
    t0 = time.perf_counter()
    factory = C.ConstraintFactory(tok, V)
    _ = factory.ll_tokenizer
    trie_s = time.perf_counter() - t0
    spec = C.grammar_from_request(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA}}}
    )
    t0 = time.perf_counter()
    compiled = factory.compile(spec)
    compile_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    factory.compile(spec)
    cached_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    for _ in range(100):
        factory.new_state(compiled)
    new_state_ms = (time.perf_counter() - t0) * 1e3 / 100

    default = "batch_masks_parallel" if constraint_masks._parallel_default() else "batch_masks_sequential"
    results = {
        "tokenizer_vocab": tok.vocab_size,
        "logits_vocab": V,
        "seqs": args.seqs,
        "steps": args.steps,
        "token_trie_build_s": round(trie_s, 3),
        "compile_ms": round(compile_ms, 2),
        "compile_cached_ms": round(cached_ms, 4),
        "new_state_ms": round(new_state_ms, 4),
        "default_method": default,
        "scenarios": {},
    }
    print(
        f"vocab {tok.vocab_size} (logits {V}), {args.seqs} JSON-schema sequences: "
        f"token trie {trie_s:.2f} s, compile {compile_ms:.1f} ms (cached {cached_ms:.3f} ms), "
        f"new_state {new_state_ms:.3f} ms"
    )
    for name, schema in SCENARIOS.items():
        r = run(factory, C.GrammarSpec("json_schema", schema, "response_format"), args.seqs, args.steps)
        results["scenarios"][name] = r
        print(
            f"[{name}] median allowed tokens/row {r['median_allowed_tokens_per_row']}, "
            f"{r['finished_and_restarted']} sequences finished"
        )
        for m in (*METHODS, "expand_to_bool"):
            t = r[m]
            tag = "  <- batch_masks default here" if m == default else ""
            print(
                f"  {m:>22}: mean {t['mean_ms']:7.3f} ms/step  p50 {t['p50_ms']:7.3f}  p95 {t['p95_ms']:7.3f}{tag}",
                flush=True,
            )

    import llguidance

    results["env"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llguidance": llguidance.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "executor_threads": os.environ.get("MISTRALRS_GRAMMAR_THREADS", str(os.cpu_count())),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
