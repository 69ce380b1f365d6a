"""Distribution: data-parallel throughput on this machine, and tensor-parallel communication per
decode step for a 70B-shaped model over 8 GPUs x 2 nodes (docs/distributed.md).

1. **Data parallel**: `mistralrs serve --data-parallel-size N` for N = 1 and 2 on a dummy-weight
   Llama (the packaged demo's tokenizer, hidden 1024, 8 layers; fp32), `--requests` concurrent chat
   requests of `--max-tokens` greedy tokens; aggregate completion tokens per second of wall time.
   On a 2-core machine two replicas share the cores one replica already uses, so parity (or a
   loss) is the honest expectation.
2. **Tensor parallel communication**: the real `distributed.sharding.TensorParallel` splits a
   Llama-3-70B-shaped model (hidden 8192, 80 layers, 64 query / 8 KV heads, vocab 128256, bf16)
   for rank 0 of 16 on the meta device; one decode step of B sequences runs on the meta device
   with the collectives replaced by recorders, so the count and size of every all-reduce and
   all-gather come from the code that would run. Per-rank bytes on the wire follow the ring
   algorithms (all-reduce 2(N-1)/N x message, all-gather (N-1)/N x result); a ring over two
   8-GPU nodes crosses between them twice, each crossing carrying one ring edge's bytes.

    python benchmarks/distributed.py [--skip-dp] [--out benchmarks/results/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu",
}


# -- tensor-parallel communication ---------------------------------------------------------------

def tp_communication(world: int, batch: int, nodes: int = 2) -> dict:
    import torch

    from mistralrs.attention import AttentionBackend, KVCacheShape
    from mistralrs.distributed import sharding
    from mistralrs.distributed.sharding import TensorParallel
    from mistralrs.loading import LoadContext, build_model, select_architecture

    class ShapeOnlyAttention(AttentionBackend):
        """Attention as shapes only (meta tensors have no values to attend over)."""

        def attend(self, layer, q, k, v, batch, **kwargs):
            return q.new_empty(q.shape[0], q.shape[1], v.shape[2])

    config = dict(LLAMA_70B)
    spec = select_architecture(config)
    ctx = LoadContext(config=config, dtype=torch.bfloat16, device=torch.device("meta"), arch=spec,
                      tensor_parallel=TensorParallel(0, world))
    model = build_model(spec, config, ctx)
    calls: list[tuple[str, int]] = []

    def all_reduce(t, group=None):
        calls.append(("all_reduce", t.numel() * t.element_size()))
        return t

    def all_gather_last(t, size, full, group=None):
        out = torch.empty(*t.shape[:-1], full, dtype=t.dtype, device=t.device)
        calls.append(("all_gather", out.numel() * out.element_size()))
        return out

    # the rotary embedding and attention read values (.max()), which meta tensors do not have; both
    # keep shapes, so the simulation runs them as shapes only
    rotary = model.model.rotary_emb
    object.__setattr__(rotary, "forward", lambda q, k, positions: (q, k))
    saved = sharding.all_reduce, sharding.all_gather_last
    sharding.all_reduce, sharding.all_gather_last = all_reduce, all_gather_last
    try:
        backend = ShapeOnlyAttention(KVCacheShape(**{**model.kv_cache_shape(), "device": "meta"}))
        with torch.inference_mode():
            ids = torch.zeros(batch, dtype=torch.long, device="meta")
            pos = torch.zeros(batch, dtype=torch.long, device="meta")
            hidden = model(ids, pos, backend.batch(list(range(batch + 1)), [1] * batch))
            model.compute_logits(hidden)
    finally:
        sharding.all_reduce, sharding.all_gather_last = saved
    n = world
    reduce_msgs = [b for kind, b in calls if kind == "all_reduce"]
    gather_msgs = [b for kind, b in calls if kind == "all_gather"]
    per_rank = sum(2 * (n - 1) / n * b for b in reduce_msgs) + sum((n - 1) / n * b for b in gather_msgs)
    edge = per_rank  # a ring edge carries what one rank sends
    kv_heads = model.kv_cache_shape()["num_kv_heads"]
    return {
        "world": n, "nodes": nodes, "batch": batch, "dtype": "bf16 activations, fp32 logits",
        "rank0_q_heads": model.model.layers[0].self_attn.num_heads, "rank0_kv_heads": kv_heads,
        "all_reduces": len(reduce_msgs), "all_reduce_bytes_each": reduce_msgs[0] if reduce_msgs else 0,
        "all_gathers": len(gather_msgs), "all_gather_result_bytes": sum(gather_msgs),
        "message_bytes_total": sum(reduce_msgs) + sum(gather_msgs),
        "ring_bytes_sent_per_rank": int(per_rank),
        "inter_node_bytes_per_crossing": int(edge) if nodes > 1 else 0,
        "inter_node_crossings": 2 if nodes > 1 else 0,
        "collectives_per_step": len(calls),
    }


# -- data-parallel throughput --------------------------------------------------------------------

def _model_dir(tmp: Path) -> Path:
    d = tmp / "llama-1024"
    shutil.copytree(ROOT / "core" / "mistralrs" / "demo" / "model", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=8, eos_token_id=[])
    (d / "config.json").write_text(json.dumps(cfg))
    gen = d / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text())
        g.pop("eos_token_id", None)
        gen.write_text(json.dumps(g))
    return d


def _serve(model: Path, dp: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs", "serve", "-m", str(model), "--dummy-weights",
                             "--dtype", "f32", "--port", "0", "--host", "127.0.0.1", "--data-parallel-size", str(dp)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = proc.stderr.readline()
    m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
    assert m, line
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    url = f"http://127.0.0.1:{m.group(1)}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up")


def dp_throughput(model: Path, dp: int, requests: int, max_tokens: int) -> dict:
    proc, url = _serve(model, dp)
    try:
        def one(i: int, out: list) -> None:
            body = json.dumps({"model": "default", "messages": [{"role": "user", "content": f"story {i}"}],
                               "max_tokens": max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                out.append(json.loads(r.read())["usage"]["completion_tokens"])

        one(-1, [])  # warm-up
        tokens: list[int] = []
        threads = [threading.Thread(target=one, args=(i, tokens)) for i in range(requests)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(120)
    return {"data_parallel_size": dp, "requests": requests, "completion_tokens": sum(tokens),
            "wall_seconds": round(wall, 2), "aggregate_tokens_per_second": round(sum(tokens) / wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    result: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}}
    result["tensor_parallel_70b"] = [tp_communication(16, b) for b in (1, 32)] + [tp_communication(8, 1, nodes=1)]
    for row in result["tensor_parallel_70b"]:
        print(f"TP {row['world']} ({row['nodes']} node(s)), batch {row['batch']}: {row['collectives_per_step']} "
              f"collectives/step ({row['all_reduces']} all-reduces of {row['all_reduce_bytes_each']} B, "
              f"{row['all_gathers']} all-gather of {row['all_gather_result_bytes']} B); "
              f"{row['ring_bytes_sent_per_rank'] / 1e6:.2f} MB sent per rank; "
              f"rank 0 holds {row['rank0_q_heads']} q / {row['rank0_kv_heads']} kv heads")
    if not args.skip_dp:
        with tempfile.TemporaryDirectory() as tmp:
            model = _model_dir(Path(tmp))
            rows = [dp_throughput(model, dp, args.requests, args.max_tokens) for dp in (1, 2)]
        result["data_parallel"] = rows
        for row in rows:
            print(f"DP {row['data_parallel_size']}: {row['completion_tokens']} tokens in {row['wall_seconds']} s = "
                  f"{row['aggregate_tokens_per_second']} tok/s")
        result["dp2_over_dp1"] = round(rows[1]["aggregate_tokens_per_second"] / rows[0]["aggregate_tokens_per_second"],
                                       2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
