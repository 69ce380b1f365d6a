"""Peak memory of loading a checkpoint, relative to the size of its weights.

Writes a random-weight Llama checkpoint (safetensors) of the given shape, then loads it with
`mistralrs.loading.load_model` in a fresh subprocess and reports

    ratio = (peak RSS during the load - RSS after `import torch`) / bytes of the loaded weights

(peak RSS from resource.getrusage ru_maxrss; /proc VmHWM is reported as a cross-check) as JSON
on stdout and in benchmarks/results/load_memory.json. Target: <= 1.3.

The checkpoint is written by a separate subprocess and this driver never imports torch: on Linux
ru_maxrss survives fork+exec, so a big parent would inflate the loader's baseline.

    python benchmarks/load_memory.py                       # ~535 MB bf16 checkpoint, loaded as bf16
    python benchmarks/load_memory.py --ckpt-dtype f32      # fp32 checkpoint -> bf16 model
    python benchmarks/load_memory.py --no-mmap             # MISTRALRS_NO_MMAP=1
    python benchmarks/load_memory.py --isq q4k             # ISQ: peak relative to the quantized size
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"
TARGET = 1.3

CHILD = r"""
import json, resource, sys, time
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from mistralrs.loading import load_model
t0 = time.perf_counter()
plan = None
if sys.argv[3]:
    from mistralrs.quantization import IsqPlan
    plan = IsqPlan(sys.argv[3])
loaded = load_model(sys.argv[1], dtype=sys.argv[2], device="cpu", quant_method_for=plan.method_for if plan else None)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hwm = None
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
except OSError:
    pass
weight_bytes = sum(t.numel() * t.element_size() for t in [*loaded.model.parameters(), *loaded.model.buffers()]
                   if t.dtype != torch.float32 or t.ndim > 1)  # weights and quantized state, not rope tables
print(json.dumps({"rss_after_import_torch": base, "peak_rss": peak, "vm_hwm": hwm, "weight_bytes": weight_bytes,
                  "load_seconds": round(seconds, 3), "loaded_dtype": str(loaded.dtype)}))
"""


def write_checkpoint(out: Path, *, hidden: int, layers: int, intermediate: int, vocab: int, heads: int,
                     kv_heads: int, dtype: str) -> int:
    import torch
    from safetensors.torch import save_file

    tdtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_theta": 10000.0, "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(tdtype)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=tdtype),
               "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = w(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=tdtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=tdtype)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--ckpt-dtype", choices=("bf16", "f16", "f32"), default="bf16")
    ap.add_argument("--dtype", default="bf16", help="dtype to load into (default bf16)")
    ap.add_argument("--no-mmap", action="store_true", help="set MISTRALRS_NO_MMAP=1 in the loading process")
    ap.add_argument("--isq", default="", help="quantize while loading (e.g. q4k): the ratio is then to the quantized size")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # the writer subprocess
    args = ap.parse_args(argv)
    shape = dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=args.vocab,
                 heads=args.heads, kv_heads=args.kv_heads, dtype=args.ckpt_dtype)
    if args.write_only:
        print(write_checkpoint(args.dir, **shape))
        return 0

    with tempfile.TemporaryDirectory(prefix="mistralrs-load-memory-") as tmp:
        ckpt = args.dir or Path(tmp) / "ckpt"
        writer = subprocess.run(
            [sys.executable, __file__, "--write-only", "--dir", str(ckpt), "--hidden", str(args.hidden),
             "--layers", str(args.layers), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
             "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--ckpt-dtype", args.ckpt_dtype],
            capture_output=True, text=True, check=False,
        )
        if writer.returncode != 0:
            sys.stderr.write(writer.stderr)
            return writer.returncode
        ckpt_bytes = int(writer.stdout.strip().splitlines()[-1])
        env = dict(os.environ)
        if args.no_mmap:
            env["MISTRALRS_NO_MMAP"] = "1"
        else:
            env.pop("MISTRALRS_NO_MMAP", None)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), args.dtype, args.isq], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        child = json.loads(proc.stdout.strip().splitlines()[-1])

    extra = child["peak_rss"] - child["rss_after_import_torch"]
    ratio = extra / child["weight_bytes"]
    result = {
        "benchmark": "load_memory",
        "shape": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "vocab": args.vocab, "heads": args.heads, "kv_heads": args.kv_heads},
        "checkpoint_dtype": args.ckpt_dtype,
        "checkpoint_bytes": ckpt_bytes,
        "loaded_dtype": child["loaded_dtype"],
        "mmap": not args.no_mmap,
        "isq": args.isq or None,
        "weight_bytes": child["weight_bytes"],
        "rss_after_import_torch": child["rss_after_import_torch"],
        "peak_rss": child["peak_rss"],
        "vm_hwm": child["vm_hwm"],
        "ratio_vm_hwm": round((child["vm_hwm"] - child["rss_after_import_torch"]) / child["weight_bytes"], 4)
        if child["vm_hwm"] else None,
        "peak_minus_import_bytes": extra,
        "ratio": round(ratio, 4),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "load_seconds": child["load_seconds"],
    }
    if args.isq and args.out == RESULTS:
        args.out = RESULTS.with_name(f"load_memory_isq_{args.isq}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
