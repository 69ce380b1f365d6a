"""How much each in-situ quantization (ISQ) type loses: sizes, weight error, and what a model's
next-token distributions do (the figures of docs/quantization.md).

For every ISQ type (``mistralrs.quantization.isq_type_names()``, or ``--types``):

* **bits per weight**: the registry's ``QuantizerSpec.bits_per_weight``, and the *stored* bits
  per weight of a 4096x4096 matrix quantized by the type's linear method (the bytes of the
  layer's state buffers * 8 / numel).
* **relative RMSE** ``||W - dequant(quant(W))|| / ||W||`` of two fixed-seed fp32 4096x4096
  matrices: N(0, 1), and a heavy-tailed one (Student's t, 4 degrees of freedom: real LLM weights
  have outliers). The method objects are used directly (``make_method(spec)`` on a meta-device
  ``Linear``, ``load_float``, ``dequantize``): the format's own error, no sensitive-type
  promotion and no shape fallback.
* **against bf16 on a small trained model**: top-1 agreement (% of positions whose argmax equals
  the bf16 model's), mean KL(bf16 || quantized) of the next-token distributions in nats, and the
  held-out perplexity (per byte), all through our loader (``load_model(dtype=bfloat16,
  quant_method_for=IsqPlan(type).method_for)``, i.e. ``--isq TYPE`` on bf16 weights). The
  sensitive-tensor policy applies as it does for users: the LM head is promoted to the type's
  ``sensitive`` type (q4k -> q6k, afq4 -> afq6, ...; fp8 and hqq keep their own type), so the
  figures are what ``--isq TYPE`` gives, not the body format alone (the per-type "methods" in
  the JSON say what each layer got). The forward is the one users get too: the best registered
  kernel of each type (``kernels`` in the JSON). Where that is a native kernel (the AVX2
  ``cpu_quant`` ops quantize the activations to 8 bits, as llama.cpp does), the type is measured
  a second time through the torch reference forward (dequantize, then matmul), which isolates
  the weight format's own error (``reference_forward``).

The small model. No pretrained weights are available offline, so one is trained here: a
transformers ``LlamaForCausalLM`` (hidden 256, intermediate 768, 4 layers, 4 heads, 2 KV heads,
untied head; every Linear's in_features is a multiple of 256 so the k-quants apply without a
fallback) on byte-level tokens (vocab 256 bytes + BOS + EOS) of the licence texts in
/usr/share/common-licenses (every regular file but Apache-2.0, which is held out: the
evaluation windows come from it, text the model has never seen). AdamW on one thread for a few
hundred steps of 8 x 256 tokens; it prints the train / held-out losses next to the byte-unigram
baseline. The checkpoint (bf16, safetensors, HF layout) is cached under ``--cache-dir`` keyed by
a hash of the training settings and the text, so re-runs skip training (``--retrain`` forces
it).

    python benchmarks/quant_quality.py [--types q4k,q8_0] [--out benchmarks/results/quant_quality.json]
                                       [--retrain] [--cache-dir /work/bench-cache/quant-quality]

Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quant_quality.json"
CACHE = Path("/work/bench-cache/quant-quality")

TEXT_DIR = Path("/usr/share/common-licenses")
HELDOUT = "Apache-2.0"
BOS, EOS = 256, 257

MODEL = dict(
    vocab_size=258, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
    bos_token_id=BOS, eos_token_id=EOS,
)
TRAIN = dict(seq_len=256, batch=8, steps=300, lr=3e-3, min_lr=3e-4, warmup=30, weight_decay=0.1,
             betas=(0.9, 0.95), grad_clip=1.0, seed=0)

MATRIX = 4096  # the RMSE / stored-size matrix is MATRIX x MATRIX
WINDOWS, WINDOW_LEN = 16, 256  # evaluation: windows of the held-out text


# --------------------------------------------------------------------------------------------
# text


def text_files() -> list[Path]:
    """The licence texts (regular files only: GPL, LGPL, GFDL are also symlinked), sorted."""
    return sorted(p for p in TEXT_DIR.iterdir() if p.is_file() and not p.is_symlink())


def load_text() -> tuple[list[int], list[int], dict]:
    """(training tokens, held-out tokens, description). Each file is BOS + its bytes."""
    train, held, names = [], [], []
    digest = hashlib.sha256()
    for path in text_files():
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + data + b"\0")
        ids = [BOS, *data]
        if path.name == HELDOUT:
            held = ids
        else:
            train += ids
            names.append(path.name)
    if not held:
        raise SystemExit(f"{TEXT_DIR / HELDOUT} not found: the held-out text is missing")
    info = {"source": str(TEXT_DIR), "train_files": names, "heldout_file": HELDOUT,
            "train_tokens": len(train), "heldout_tokens": len(held), "sha256": digest.hexdigest(),
            "tokens": "bytes 0-255, BOS 256 before each file, EOS 257 (unused)"}
    return train, held, info


def eval_windows(held: list[int]) -> list[list[int]]:
    """WINDOWS windows of WINDOW_LEN tokens, evenly spaced over the held-out text."""
    span = len(held) - WINDOW_LEN
    starts = [round(i * span / max(WINDOWS - 1, 1)) for i in range(WINDOWS)]
    return [held[s:s + WINDOW_LEN] for s in starts]


def unigram_nll(train: list[int], windows: list[list[int]]) -> float:
    """Cross-entropy (nats) of the held-out targets under the training text's byte frequencies
    (add-one smoothing): the loss a model that ignores context would reach."""
    counts = [1] * MODEL["vocab_size"]
    for t in train:
        counts[t] += 1
    total = sum(counts)
    targets = [t for w in windows for t in w[1:]]
    return -sum(math.log(counts[t] / total) for t in targets) / len(targets)


# --------------------------------------------------------------------------------------------
# training (transformers; cached)


def settings_key(text_info: dict) -> str:
    blob = json.dumps({"model": MODEL, "train": TRAIN, "text_sha256": text_info["sha256"],
                       "heldout": HELDOUT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_model(out_dir: Path, train: list[int], windows: list[list[int]]) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = TRAIN
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).float()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=cfg["betas"])
    data = torch.tensor(train, dtype=torch.long)
    held = torch.tensor(windows, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg["seed"])
    T, B, steps = cfg["seq_len"], cfg["batch"], cfg["steps"]
    # a fixed sample of training windows, scored like the held-out ones at the end
    train_probe = torch.stack([data[s:s + WINDOW_LEN] for s in
                               torch.randint(0, len(data) - WINDOW_LEN, (WINDOWS,), generator=torch.Generator().manual_seed(99))])

    def lr_at(step: int) -> float:
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        frac = (step - cfg["warmup"]) / max(steps - cfg["warmup"], 1)
        return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * frac))

    def score(ids: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        model.train()
        return float(loss)

    history = []
    recent: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        batch = torch.stack([data[s:s + T + 1] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % 50 == 0 or step == 0 or step + 1 == steps:
            held_loss = score(held)
            history.append({"step": step + 1, "train_loss_last20": round(sum(recent) / len(recent), 4),
                            "heldout_loss": round(held_loss, 4), "seconds": round(time.perf_counter() - t0, 1)})
            print(f"  step {step + 1:4d}/{steps}  train {history[-1]['train_loss_last20']:.3f}  "
                  f"held-out {held_loss:.3f}  ({history[-1]['seconds']:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    final = {"train_loss": round(score(train_probe), 4), "heldout_loss": round(score(held), 4)}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    info = {"params": n_params, "steps": steps, "tokens_seen": steps * B * T, "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "history": history, **final}
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def cached_model(cache_dir: Path, retrain: bool, train: list[int], windows: list[list[int]],
                 text_info: dict) -> tuple[Path, dict]:
    path = cache_dir / f"llama-bytes-{settings_key(text_info)}"
    if not retrain and (path / "training.json").exists() and (path / "config.json").exists():
        print(f"trained model: cached at {path}")
        return path, json.loads((path / "training.json").read_text())
    print(f"training the small model ({TRAIN['steps']} steps of {TRAIN['batch']}x{TRAIN['seq_len']} tokens) -> {path}")
    return path, train_model(path, train, windows)


# --------------------------------------------------------------------------------------------
# weight error of the formats


def test_matrices(n: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(1234)
    normal = torch.randn(n, n, generator=gen)
    # Student's t with 4 degrees of freedom: Z / sqrt(chi2_4 / 4)
    z = torch.randn(n, n, generator=gen)
    chi2 = sum(torch.randn(n, n, generator=gen).square() for _ in range(4))
    heavy = z / (chi2 / 4).sqrt()
    return {"normal": normal, "heavy": heavy}


def weight_error(spec: Any, matrices: dict[str, Any]) -> dict:
    import torch

    from mistralrs.nn.linear import Linear
    from mistralrs.quantization import make_method

    out: dict[str, Any] = {}
    for kind, w in matrices.items():
        method = make_method(spec)
        with torch.device("meta"):
            layer = Linear(w.shape[1], w.shape[0], quant_method=method)
        reason = method.check_shape(w.shape[0], w.shape[1])
        if reason:
            raise RuntimeError(f"{spec.name}: {reason}")
        t0 = time.perf_counter()
        method.load_float(layer, w)
        out[f"quantize_seconds_{kind}"] = round(time.perf_counter() - t0, 2)
        stored = sum(b.numel() * b.element_size() for b in layer.buffers())
        out["stored_bytes"] = stored
        out["stored_bpw"] = round(stored * 8 / w.numel(), 4)
        deq = method.dequantize(layer).float()
        out[f"rel_rmse_{kind}"] = float((w - deq).norm() / w.norm())
        del layer, deq
    return out


# --------------------------------------------------------------------------------------------
# our loader on the trained model


def our_logits(loaded: Any, ids: Any) -> Any:
    """All-position float32 logits of one sequence, no KV cache (as tests/helpers/parity.py)."""
    import torch

    from mistralrs.loading import build_attention_backend

    backend = build_attention_backend(loaded, name="sdpa")
    n = int(ids.shape[0])
    batch = backend.batch([0, n], [n])
    with torch.no_grad():
        return loaded.model.compute_logits(loaded.model(ids, torch.arange(n), batch)).float()


def kernel_label(fn: Any) -> str:
    """What served a quantized matmul: "module:function", with "(native)" or "(native build
    unavailable: reference)" for the native ops, which fall back to the reference when they cannot
    be built."""
    label = f"{fn.__module__}:{getattr(fn, '__name__', type(fn).__name__)}"
    ops = sys.modules.get("mistralrs_plugins.kernels.cpu_quant.ops")
    if ops is not None and fn.__module__ == ops.__name__:
        native = getattr(ops, "_ext", None) is not None and getattr(ops, "_failed", None) is None
        label += " (native)" if native else " (native build unavailable: reference)"
    return label


def model_logprobs(path: Path, windows: list[list[int]], isq: str | None, dtype: Any,
                   reference_kernels: bool = False, importance: Any = None) -> tuple[Any, dict]:
    """Log-softmax of every position of every window ([W, T, V]) and what the load did.
    `reference_kernels`: quantized matmuls through the registered torch reference of their op
    (dequantize, then matmul) instead of the best kernel, i.e. without a native kernel's
    activation quantization. `importance`: an imatrix for the quantizers."""
    import torch

    from mistralrs.loading import load_model
    from mistralrs.nn.linear import describe_methods, linear_layers
    from mistralrs.plugins import get_registry
    from mistralrs.quantization import IsqPlan
    from mistralrs.specs import resolve

    plan = IsqPlan(isq) if isq else None
    if plan is not None:
        plan.importance = importance  # an imatrix.Imatrix (benchmarks/imatrix_quality.py), or None
    t0 = time.perf_counter()
    loaded = load_model(path, dtype=dtype, quant_method_for=plan.method_for if plan else None)
    load_s = time.perf_counter() - t0
    linear_bytes = linear_numel = 0
    layers = linear_layers(loaded.model)
    for _, layer in layers:
        linear_numel += layer.in_features * layer.out_features
        linear_bytes += sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()]
                            if t is not getattr(layer, "bias", None))
        method = layer.quant_method
        if reference_kernels and hasattr(method, "_kernel") and hasattr(method, "qtype"):
            method._kernel = resolve(get_registry().reference_kernel(f"qmatmul_{method.qtype}").impl)
    t0 = time.perf_counter()
    out = torch.stack([torch.log_softmax(our_logits(loaded, torch.tensor(w)), dim=-1) for w in windows])
    forward_s = time.perf_counter() - t0
    kernels: dict[str, str] = {}
    for _, layer in layers:
        method = layer.quant_method
        fn = getattr(method, "_kernel", None)
        if fn is not None:
            kernels[method.describe()] = kernel_label(fn)
        elif method.describe() != "unquantized":
            kernels[method.describe()] = f"{type(method).__module__}:{type(method).__name__}.matmul"
    info = {"methods": describe_methods(loaded.model), "fallbacks": plan.report() if plan else [],
            "kernels": kernels, "model_linear_bpw": round(linear_bytes * 8 / linear_numel, 4),
            "load_seconds": round(load_s, 2), "forward_seconds": round(forward_s, 2)}
    return out, info


def compare(ref: Any, got: Any, windows: list[list[int]]) -> dict:
    """Top-1 agreement (%), mean KL(ref || got) (nats) over every position, and the perplexity
    of `got` on the windows' next tokens (per byte)."""
    import torch

    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean()) * 100
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    targets = torch.tensor([w[1:] for w in windows])
    nll = -got[:, :-1].gather(-1, targets[..., None]).squeeze(-1).mean()
    return {"top1_agreement_pct": round(top1, 2), "mean_kl_nats": kl, "perplexity": round(float(nll.exp()), 4),
            "nll_nats": round(float(nll), 4)}


# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "mistralrs_commit": commit}


def fmt_kl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def markdown(rows: dict, bf16: dict) -> str:
    lines = ["| type | bits/weight | stored bpw | rel. RMSE normal | rel. RMSE heavy-tailed | "
             "top-1 agreement | mean KL (nats) | perplexity |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| bf16 (reference) | 16 | 16 | 0 | 0 | 100% | 0 | {bf16['perplexity']:.3f} |"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['bits_per_weight']:g} | {r['stored_bpw']:g} | {r['rel_rmse_normal']:.4f} | "
            f"{r['rel_rmse_heavy']:.4f} | {r['top1_agreement_pct']:.2f}% | {fmt_kl(r['mean_kl_nats'])} | "
            f"{r['perplexity']:.3f} |")
    native = [(n, r) for n, r in rows.items() if r.get("native_kernels")]
    if native:
        lines.append("")
        lines.append(
            "Native kernels (8-bit activations, as llama.cpp) served the layers of the types in brackets; "
            "the same types through the torch reference forward (dequantize, then matmul; weights only): " +
            "; ".join(f"{n} [{'+'.join(r['native_kernels'])}] top-1 {r['reference_forward']['top1_agreement_pct']:.2f}%, "
                      f"KL {fmt_kl(r['reference_forward']['mean_kl_nats'])}" for n, r in native) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="", help="comma-separated ISQ types (default: every registered ISQ type)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--retrain", action="store_true", help="train the small model even if it is cached")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help=f"trained-model cache (default {CACHE})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help=f"training steps (default {TRAIN['steps']})")
    args = ap.parse_args(argv)
    TRAIN["steps"] = args.steps

    import torch

    torch.set_num_threads(args.threads)
    from mistralrs.quantization import isq_specs, resolve_isq_type

    specs = {s.name: s for s in isq_specs()}
    if args.types:
        names = [resolve_isq_type(t.strip()).name for t in args.types.split(",") if t.strip()]
    else:
        names = sorted(specs, key=lambda n: (float(specs[n].bits_per_weight or 0), n))

    # 1. the small model
    train, held, text_info = load_text()
    windows = eval_windows(held)
    unigram = unigram_nll(train, windows)
    path, training = cached_model(args.cache_dir, args.retrain, train, windows, text_info)
    print(f"  params {training['params']:,}; {training['steps']} steps, {training['tokens_seen']:,} tokens seen "
          f"({training['tokens_seen'] / len(train):.1f} epochs of {len(train):,}); "
          f"train loss {training['train_loss']:.3f}, held-out loss {training['heldout_loss']:.3f} nats/byte "
          f"(byte-unigram baseline {unigram:.3f})", flush=True)

    # 2. bf16 reference (and fp32, the floor of the comparison: what bf16 rounding alone costs)
    ref, ref_info = model_logprobs(path, windows, None, torch.bfloat16)
    bf16 = {**compare(ref, ref, windows), **ref_info}
    f32, _ = model_logprobs(path, windows, None, torch.float32)
    fp32_vs_bf16 = compare(ref, f32, windows)
    print(f"bf16: perplexity {bf16['perplexity']:.3f} per byte; fp32 (same bf16 weights, fp32 compute) vs bf16: "
          f"top-1 {fp32_vs_bf16['top1_agreement_pct']:.2f}%, KL {fmt_kl(fp32_vs_bf16['mean_kl_nats'])}", flush=True)

    # 3. per type
    matrices = test_matrices(MATRIX)
    rows: dict[str, dict] = {}
    t_all = time.perf_counter()
    for name in names:
        spec = specs[name]
        t0 = time.perf_counter()
        row: dict[str, Any] = {"bits_per_weight": float(spec.bits_per_weight), "sensitive_type": spec.sensitive}
        row.update(weight_error(spec, matrices))
        got, info = model_logprobs(path, windows, name, torch.bfloat16)
        row.update(compare(ref, got, windows))
        row.update(info)
        row["native_kernels"] = sorted(t for t, k in info["kernels"].items() if "(native)" in k)
        if row["native_kernels"]:
            # the format's own error on the model, without the kernel's 8-bit activations
            got_ref, _ = model_logprobs(path, windows, name, torch.bfloat16, reference_kernels=True)
            row["reference_forward"] = compare(ref, got_ref, windows)
            del got_ref
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(f"{name:6s} bpw {row['bits_per_weight']:g} (stored {row['stored_bpw']:g})  rmse {row['rel_rmse_normal']:.4f} / "
              f"{row['rel_rmse_heavy']:.4f}  top-1 {row['top1_agreement_pct']:.2f}%  KL {fmt_kl(row['mean_kl_nats'])}  "
              f"ppl {row['perplexity']:.3f}  methods {row['methods']}  ({row['seconds']:.0f}s)", flush=True)
        if "reference_forward" in row:
            r = row["reference_forward"]
            print(f"       native {'+'.join(row['native_kernels'])}; reference forward (no activation quantization): top-1 {r['top1_agreement_pct']:.2f}%  "
                  f"KL {fmt_kl(r['mean_kl_nats'])}  ppl {r['perplexity']:.3f}", flush=True)
        del got

    result = {
        "benchmark": "quant_quality",
        "machine": machine_info(),
        "what": {
            "bits_per_weight": "QuantizerSpec.bits_per_weight (registry)",
            "stored_bpw": f"bytes of the state buffers of a {MATRIX}x{MATRIX} layer * 8 / numel",
            "rel_rmse": f"||W - dequant(quant(W))|| / ||W||, fp32 {MATRIX}x{MATRIX}, seed 1234; normal = N(0,1), "
                        "heavy = Student's t (df 4); the method alone (no promotion, no fallback)",
            "top1_agreement_pct": "% of positions whose argmax equals the bf16 model's",
            "mean_kl_nats": "mean over positions of KL(bf16 || --isq TYPE) of the next-token distributions",
            "perplexity": "exp(mean next-byte NLL) on the held-out windows",
            "policy": "--isq TYPE as users get it: the LM head is promoted to the type's sensitive type "
                      "(see 'methods' per type); the token embedding (untied) stays bf16",
            "model_linear_bpw": "bits per weight over all of the model's Linear layers (LM head included)",
        },
        "model": {"config": MODEL, "path": str(path), "training_settings": {**TRAIN, "betas": list(TRAIN["betas"])},
                  "training": training, "text": text_info, "unigram_heldout_nll": round(unigram, 4)},
        "eval": {"windows": WINDOWS, "window_len": WINDOW_LEN, "positions": WINDOWS * WINDOW_LEN},
        "bf16": bf16,
        "fp32_vs_bf16": fp32_vs_bf16,
        "types": rows,
        "seconds_per_type_total": round(time.perf_counter() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(rows, bf16))
    print(f"\n{WINDOWS} held-out windows x {WINDOW_LEN} tokens; KL(bf16 || type) in nats; perplexity per byte. "
          f"fp32-vs-bf16 floor: top-1 {fp32_vs_bf16['top1_agreement_pct']:.2f}%, KL {fmt_kl(fp32_vs_bf16['mean_kl_nats'])}.")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
