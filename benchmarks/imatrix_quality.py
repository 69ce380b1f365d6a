"""What an importance matrix buys: the quant_quality model's next-token distributions against
bf16, with and without an imatrix, per ISQ type (the imatrix table of docs/quantization.md).

The small byte-level Llama of `quant_quality.py` (trained there and cached) is loaded in bf16;
its imatrix is collected (`mistralrs.imatrix.collect_imatrix`, what ``--calibration-file`` does)
over CALIB_TOKENS tokens of its *training* text (the evaluation windows are the held-out text,
never trained or calibrated on). Then, for each type, ``--isq TYPE`` with and without that
imatrix through our loader, scored as quant_quality does: top-1 agreement with bf16's argmax,
mean KL(bf16 || quantized) in nats and perplexity per byte, plus the relative change of KL; and
the layers' own figure: the expected output error of every Linear (but the head) under the
held-out text's activation statistics, sum_j E[x_j^2] (w_j - dq(q(w))_j)^2, with the imatrix
relative to without.

    python benchmarks/imatrix_quality.py [--types q2k,q3k,q4k,q4_0,q5k] [--out benchmarks/results/imatrix_quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_quality as QQ  # noqa: E402

RESULTS = QQ.ROOT / "benchmarks" / "results" / "imatrix_quality.json"
CALIB_TOKENS = 8192


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="q2k,q3k,q4k,q4_0,q5k")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache-dir", type=Path, default=QQ.CACHE)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from mistralrs.imatrix import collect_imatrix
    from mistralrs.loading import load_model

    torch.set_num_threads(args.threads)
    train, held, text_info = QQ.load_text()
    windows = QQ.eval_windows(held)
    path, _training = QQ.cached_model(args.cache_dir, False, train, windows, text_info)
    ref, _ = QQ.model_logprobs(path, windows, None, torch.bfloat16)

    start = max(0, (len(train) - CALIB_TOKENS) // 2)
    calib = train[start:start + CALIB_TOKENS]
    t0 = time.perf_counter()
    imatrix = collect_imatrix(load_model(path, dtype=torch.bfloat16).model, calib, source="training text")
    collect_s = time.perf_counter() - t0
    print(f"imatrix over {len(calib)} training tokens, {len(imatrix)} layers, {collect_s:.1f} s", flush=True)

    # the layers' own figure: expected output error under the held-out text's activation statistics,
    # sum_j E[x_j^2] (w_j - dq(q(w))_j)^2 summed over every Linear but the head, with / without the imatrix
    from mistralrs.nn.linear import linear_layers
    from mistralrs_plugins.quant.ggml.formats import dequantize, quantize

    f32 = load_model(path, dtype=torch.float32).model
    held_stats = collect_imatrix(f32, [t for w in windows for t in w], source="held-out windows")

    def layer_error(qtype: str, weighted: bool) -> float:
        total = 0.0
        for lname, layer in linear_layers(f32):
            if lname == "lm_head":
                continue
            w = layer.weight.float()
            imp = imatrix.for_layer(lname, layer.in_features) if weighted else None
            dq = dequantize(qtype, quantize(qtype, w, importance=imp), w.shape[1])
            total += float(((w - dq) ** 2 * held_stats.for_layer(lname, layer.in_features)).sum())
        return total

    rows = {}
    for name in [t.strip() for t in args.types.split(",") if t.strip()]:
        err_ratio = layer_error(name, True) / layer_error(name, False)
        plain, _ = QQ.model_logprobs(path, windows, name, torch.bfloat16)
        weighted, info = QQ.model_logprobs(path, windows, name, torch.bfloat16, importance=imatrix)
        a, b = QQ.compare(ref, plain, windows), QQ.compare(ref, weighted, windows)
        change = (b["mean_kl_nats"] - a["mean_kl_nats"]) / a["mean_kl_nats"] * 100
        rows[name] = {"plain": a, "imatrix": b, "kl_change_pct": round(change, 1), "methods": info["methods"],
                      "layer_output_error_ratio": round(err_ratio, 3)}
        print(f"{name:5s} KL {QQ.fmt_kl(a['mean_kl_nats'])} -> {QQ.fmt_kl(b['mean_kl_nats'])} ({change:+.1f}%)  "
              f"top-1 {a['top1_agreement_pct']:.2f}% -> {b['top1_agreement_pct']:.2f}%  "
              f"ppl {a['perplexity']:.3f} -> {b['perplexity']:.3f}; layer output error x{err_ratio:.3f}", flush=True)
    result = {"benchmark": "imatrix_quality", "machine": QQ.machine_info(), "calibration_tokens": len(calib),
              "calibration": "the middle of the training text", "evaluation": "quant_quality's held-out windows",
              "types": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| type | layer output error | KL plain | KL imatrix | change | top-1 plain | top-1 imatrix | ppl plain | "
          "ppl imatrix |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        a, b = r["plain"], r["imatrix"]
        print(f"| {name} | x{r['layer_output_error_ratio']:.3f} | {QQ.fmt_kl(a['mean_kl_nats'])} | {QQ.fmt_kl(b['mean_kl_nats'])} | {r['kl_change_pct']:+.1f}% | "
              f"{a['top1_agreement_pct']:.2f}% | {b['top1_agreement_pct']:.2f}% | {a['perplexity']:.3f} | "
              f"{b['perplexity']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
