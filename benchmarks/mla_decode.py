"""Decode speed and KV-cache size of DeepSeek's multi-head latent attention: the compressed latent
cache (default) vs ``MISTRALRS_NO_MLA=1``'s full per-head K/V, on a dummy-weight model with
DeepSeek-V2-Lite's attention and expert shapes (hidden 2048, 16 heads, kv_lora_rank 512, rope 64,
nope 128, v 128, no q LoRA, 2 shared experts of 1408, top-6 routing) scaled down in depth,
expert count and vocabulary so it runs on a small CPU box (the per-layer, per-token work of
attention and of each expert is V2-Lite's).

For each path and batch size: prefill `--context` tokens per sequence through the paged backend,
then time `--steps` batched decode steps (tokens/s = batch * steps / time). KV bytes per token are
the backend's own figure (``bytes_per_block / block_size``), and the full-model figure for the
real V2-Lite (27 layers) is printed beside it.

    python benchmarks/mla_decode.py [--threads 2] [--dtype bf16] [--out benchmarks/results/mla_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048, num_attention_heads=16,
    num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, rms_norm_eps=1e-6, max_position_embeddings=163840, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
                     "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
)
V2_LITE_LAYERS = 27


def run(path: Path, *, no_mla: bool, dtype: str, batch: int, context: int, steps: int) -> dict:
    import torch

    from mistralrs.loading import build_attention_backend, load_model

    if no_mla:
        os.environ["MISTRALRS_NO_MLA"] = "1"
    else:
        os.environ.pop("MISTRALRS_NO_MLA", None)
    loaded = load_model(path, dtype=dtype, dummy_weights=True)
    model = loaded.model
    bs = 32
    per_seq = -(-(context + steps + 1) // bs)
    backend = build_attention_backend(loaded, name="paged", num_blocks=batch * per_seq, block_size=bs)
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    vocab = int(loaded.config["vocab_size"])
    g = torch.Generator().manual_seed(0)

    def slots(i: int, positions: range) -> list[int]:
        return [int(tables[i, p // bs]) * bs + p % bs for p in positions]

    with torch.no_grad():
        for i in range(batch):  # prefill one sequence at a time
            ids = torch.randint(0, vocab, (context,), generator=g)
            b = backend.batch([0, context], [context], slot_mapping=torch.tensor(slots(i, range(context))),
                              block_tables=tables[i:i + 1])
            model(ids, torch.arange(context), b)
        last = torch.randint(0, vocab, (batch,), generator=g)
        times = []
        for step in range(steps + 1):
            pos = context + step
            b = backend.batch(list(range(batch + 1)), [pos + 1] * batch,
                              slot_mapping=torch.tensor([slots(i, range(pos, pos + 1))[0] for i in range(batch)]),
                              block_tables=tables)
            t0 = time.perf_counter()
            last = model.compute_logits(model(last, torch.full((batch,), pos), b)).argmax(-1)
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
    return {
        "path": "full K/V (MISTRALRS_NO_MLA=1)" if no_mla else "MLA latent cache",
        "batch": batch,
        "context": context,
        "decode_tok_s": round(batch * len(times) / sum(times), 2),
        "kv_bytes_per_token": backend.bytes_per_block() // bs,
        "kv_shape": {k: v for k, v in model.kv_cache_shape().items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default="benchmarks/results/mla_decode.json")
    args = ap.parse_args()

    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    config = dict(V2_LITE, num_hidden_layers=args.layers, n_routed_experts=args.experts, vocab_size=args.vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "config.json").write_text(json.dumps(config))
        for batch in (int(b) for b in args.batches.split(",")):
            for no_mla in (False, True):
                row = run(path, no_mla=no_mla, dtype=args.dtype, batch=batch, context=args.context, steps=args.steps)
                row["kv_bytes_per_token_v2_lite_27_layers"] = row["kv_bytes_per_token"] // args.layers * V2_LITE_LAYERS
                rows.append(row)
                print(f"{row['path']:<30} batch {batch:>2}  ctx {args.context}: {row['decode_tok_s']:8.2f} tok/s   "
                      f"KV {row['kv_bytes_per_token']:>7} B/token ({args.layers} layers), "
                      f"{row['kv_bytes_per_token_v2_lite_27_layers']:>7} B/token at V2-Lite's 27 layers")
    mla = next(r for r in rows if "latent" in r["path"])
    full = next(r for r in rows if "full" in r["path"])
    ratio = full["kv_bytes_per_token"] / mla["kv_bytes_per_token"]
    print(f"KV cache: the latent cache is {ratio:.2f}x smaller than full K/V")
    out = {"benchmark": "mla_decode", "dtype": args.dtype, "threads": args.threads, "layers": args.layers,
           "experts": args.experts, "vocab": args.vocab, "kv_ratio_full_over_mla": round(ratio, 3), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
