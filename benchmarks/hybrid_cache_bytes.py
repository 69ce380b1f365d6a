"""Cache bytes of a hybrid (Mamba-2 + attention) model vs a plain GQA cache of the same model,
computed from the config through the model's own ``kv_cache_shape()`` / ``recurrent_state_shape()``
and the backend's arithmetic (no weights; the model is built on the meta device).

The shape is Granite-4.0-H-Tiny's as published (hidden 1536, 40 layers of which 4 are attention,
12 query / 4 KV heads of 128, Mamba-2 with 48 heads of 64, d_state 128, one group, conv 4,
expand 2, 64 experts top-6). Rows:

* ``gqa_all_layers``: K/V for every layer (what the cache would take if all 40 were attention);
* ``hybrid_kv``: the paged K/V the hybrid model really takes per token (its 4 attention layers);
* ``hybrid_state_per_sequence``: the fixed recurrent state per sequence (36 Mamba layers: conv
  window + float32 SSM state), independent of the context length;
* per context length L: the hybrid's total per token, ``hybrid_kv + state / L``, and the ratio
  to the GQA figure.

    python benchmarks/hybrid_cache_bytes.py [--dtype bf16] [--out benchmarks/results/hybrid_cache_bytes.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GRANITE_4_H_TINY = dict(
    architectures=["GraniteMoeHybridForCausalLM"], model_type="granitemoehybrid", vocab_size=100352,
    hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024, num_hidden_layers=40,
    num_attention_heads=12, num_key_value_heads=4, num_local_experts=64, num_experts_per_tok=6,
    mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
    mamba_chunk_size=256, position_embedding_type="nope", rms_norm_eps=1e-5, max_position_embeddings=131072,
    layer_types=["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
    embedding_multiplier=12.0, attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=6.0,
)
CONTEXTS = (1024, 4096, 32768, 131072)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--out", default="benchmarks/results/hybrid_cache_bytes.json")
    args = ap.parse_args()

    import torch

    from mistralrs.attention import kv_elements_per_token
    from mistralrs.state_cache import RecurrentStateShape
    from mistralrs_plugins.models.granitemoehybrid.model import GraniteMoeHybridForCausalLM

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        model = GraniteMoeHybridForCausalLM(GRANITE_4_H_TINY)
    kv = model.kv_cache_shape()
    hybrid_kv = kv_elements_per_token(kv) * itemsize
    gqa = kv_elements_per_token({**kv, "num_layers": GRANITE_4_H_TINY["num_hidden_layers"]}) * itemsize
    rec = RecurrentStateShape.from_model(model.recurrent_state_shape(), dtype=dtype)
    state = rec.bytes_per_sequence()
    rows = []
    for length in CONTEXTS:
        total = hybrid_kv + state / length
        rows.append({"context": length, "hybrid_bytes_per_token": round(total, 1),
                     "gqa_bytes_per_token": gqa, "hybrid_over_gqa": round(total / gqa, 4)})
    result = {
        "model": "Granite-4.0-H-Tiny shape (config only, no weights)",
        "dtype": args.dtype,
        "attention_layers": kv["num_layers"],
        "mamba_layers": rec.num_layers,
        "states": {name: list(dims) for name, dims in rec.states},
        "gqa_all_layers_bytes_per_token": gqa,
        "hybrid_kv_bytes_per_token": hybrid_kv,
        "hybrid_state_bytes_per_sequence": state,
        "per_context": rows,
    }
    print(f"plain GQA cache (all {GRANITE_4_H_TINY['num_hidden_layers']} layers): {gqa} B/token")
    print(f"hybrid paged K/V ({kv['num_layers']} attention layers): {hybrid_kv} B/token "
          f"({gqa / hybrid_kv:.1f}x smaller)")
    print(f"hybrid recurrent state ({rec.num_layers} Mamba layers): {state / 2**20:.2f} MiB per sequence")
    for r in rows:
        print(f"  context {r['context']:>6}: hybrid {r['hybrid_bytes_per_token']:>9.1f} B/token = "
              f"{r['hybrid_over_gqa']:.3f} x GQA")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
