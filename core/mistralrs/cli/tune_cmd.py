"""`mistralrs tune [auto|text] -m MODEL [--profile quality|balanced|fast] [--json] [--emit-config FILE]`.

Recommends an in-situ quantization (ISQ) level for a model on this machine from its
config.json alone: no weights are downloaded (`-m` may be a Hub id, a local directory, or
`demo`). For each level it estimates

- **Est. Size**: the weights' bytes. The model is built on torch's meta device (no memory) to
  count its parameters exactly; when no installed architecture serves the config, a
  Llama-style formula over config.json is used instead. Matrices (ndim >= 2) are quantized at
  the level's bits per weight as its quantizer plugin registers it (GGML blocks: q8_0 8.5, q6k
  6.5625, q5k 5.5, q4k 4.5, q3k 3.4375, q2k 2.625); token embeddings and an untied lm_head take
  the level's sensitive-tensor type (q2k-q4k -> q6k, q5k-q8_0 -> q8_0); norms and biases keep the
  dtype. Levels no installed quantizer provides are left out.
  "None" keeps every weight in the dtype (`--dtype`, auto = what the device computes natively).
- **RAM % / VRAM %**: size / total memory of the device (RAM on the CPU, VRAM on CUDA, 75% of
  RAM on MPS, overridable with MISTRALRS_IGPU_MEMORY_FRACTION).
- **Context Room**: tokens of KV cache that fit in the budget left after the weights and a
  512 MiB runtime reserve; the budget is 90% of available RAM (CPU) or of free VRAM (CUDA).
  Capped at the model's max context, shown as "(max)".
- **Status**: Fits when at least min(4096, max context) tokens of context fit; on a GPU,
  Hybrid when the weights would fit in VRAM + RAM (CPU offload); else Too Large.

Profiles pick among the options that fit: quality = the most precise; balanced = the most
precise quantized level (q8_0 first) that leaves min(16k, max context) tokens of context, else
any quantized level that fits; fast = q4k, else q3k, else q2k (fewest bytes read per token at
acceptable quality).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

from mistralrs.attention import kv_elements_per_token
from mistralrs.cli.model_options import add_model_arguments

PROFILES = ("quality", "balanced", "fast")
# (name, label, quality note): the levels tune weighs, most precise first. "none" keeps the dtype.
# Bits per weight and the sensitive-tensor type come from the installed quantizers' specs.
LEVELS: tuple[tuple[str, str, str], ...] = (
    ("none", "None", "Baseline"),
    ("q8_0", "Q8_0", "Near-lossless"),
    ("q6k", "Q6K", "Good"),
    ("q5k", "Q5K", "Good"),
    ("q4k", "Q4K", "Acceptable"),
    ("q3k", "Q3K", "Degraded"),
    ("q2k", "Q2K", "Degraded"),
)
RUNTIME_RESERVE_BYTES = 512 * 1024**2
BUDGET_FRACTION = 0.9
MIN_CONTEXT = 4096
BALANCED_CONTEXT = 16384
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, runtime=False)
    t = parser.add_argument_group("tune")
    t.add_argument("--profile", choices=PROFILES, default="balanced",
                   help="what to optimise for: quality, balanced or fast (default balanced)")
    t.add_argument("--json", action="store_true", help="print the analysis as JSON")
    t.add_argument("--emit-config", metavar="FILE",
                   help="write a `mistralrs from-config` TOML file with the recommended settings")
    t.add_argument("--plan-devices", metavar="DEVICE=SIZE;...",
                   help="propose a device map for these devices (e.g. cuda:0=24GB;cuda:1=24GB) instead of this "
                        "machine's GPUs (docs/distributed.md)")


# ----------------------------------------------------------------------------- model shape


def _config_for(args: argparse.Namespace) -> tuple[dict, str]:
    """(config.json contents, where it came from) without downloading any weights."""
    from mistralrs.loading import read_config

    if args.model_id == "demo":
        from mistralrs.demo import demo_model_dir

        path = demo_model_dir() / "config.json"
        return read_config(path), str(path)
    from mistralrs.errors import ModelLoadError
    from mistralrs.hub import fetch_model

    files = fetch_model(args.model_id, revision=args.revision, token_source=args.token_source,
                        hf_cache=args.hf_cache, require_weights=False)
    if files.config is None:
        raise ModelLoadError(f"{args.model_id} has no config.json; tune needs it to estimate sizes")
    return read_config(files.config), str(files.config)


def _int(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def text_config(config: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it in text_config)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def formula_shape(config: dict) -> dict[str, Any]:
    """Parameter groups and KV shape of a Llama-style decoder from config.json alone."""
    from mistralrs.errors import ModelLoadError

    c = text_config(config)
    h = _int(c, "hidden_size", "n_embd", "d_model")
    layers = _int(c, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(c, "num_attention_heads", "n_head")
    vocab = _int(c, "vocab_size")
    if not (h and layers and heads and vocab):
        raise ModelLoadError("config.json lacks hidden_size / num_hidden_layers / num_attention_heads / "
                             "vocab_size; cannot estimate the model's size")
    kv_heads = _int(c, "num_key_value_heads", "n_head_kv") or heads
    head_dim = _int(c, "head_dim") or h // heads
    inter = _int(c, "intermediate_size", "n_inner", "ffn_dim") or 4 * h
    experts = _int(c, "num_local_experts", "num_experts", "n_routed_experts") or 0
    attn = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    if experts:
        moe_inter = _int(c, "moe_intermediate_size") or inter
        shared = _int(c, "shared_expert_intermediate_size") or 0
        mlp = experts * 3 * h * moe_inter + h * experts + 3 * h * shared
    else:
        mlp = 3 * h * inter
    tied = bool(c.get("tie_word_embeddings", False))
    return {
        "params": {
            "linear": layers * (attn + mlp),
            "embedding": vocab * h,
            "lm_head": 0 if tied else vocab * h,
            "other": layers * 2 * h + h,
        },
        "kv": {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "v_head_dim": head_dim},
        "method": "config formula",
    }


def meta_shape(config: dict, arch: str | None, dtype: Any, registry: Any) -> dict[str, Any]:
    """Exact parameter groups and KV shape: the architecture built on the meta device."""
    import torch

    from mistralrs.loading import LoadContext, build_model, select_architecture
    from mistralrs.nn.embedding import Embedding

    spec = select_architecture(config, arch, registry)
    ctx = LoadContext(config=config, dtype=dtype, device=torch.device("meta"), registry=registry, arch=spec)
    model = build_model(spec, config, ctx)
    embeds = {name for name, m in model.named_modules() if isinstance(m, (Embedding, torch.nn.Embedding))}
    groups = {"linear": 0, "embedding": 0, "lm_head": 0, "other": 0}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in embeds:
            key = "embedding"
        elif "lm_head" in name:
            key = "lm_head"
        elif p.ndim >= 2:
            key = "linear"
        else:
            key = "other"
        groups[key] += p.numel()
    kv = dict(model.kv_cache_shape())  # type: ignore[operator]
    from mistralrs.device_map import model_sizes

    return {"params": groups, "kv": kv, "method": f"architecture {spec.name} (meta build)", "architecture": spec.name,
            "sizes": model_sizes(model, kv)}


# ----------------------------------------------------------------------------- memory


def detect_memory(device: str) -> dict[str, Any]:
    """Total and usable bytes of the memory the weights would live in."""
    from mistralrs.cli.doctor_cmd import memory_report

    ram = memory_report()
    ram_total = ram.get("total_bytes") or 0
    ram_avail = ram.get("available_bytes") or ram_total
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"kind": "VRAM", "total_bytes": total, "available_bytes": free,
                "budget_bytes": int(free * BUDGET_FRACTION), "ram_budget_bytes": int(ram_avail * BUDGET_FRACTION)}
    if device == "mps":
        try:
            frac = float(os.environ.get("MISTRALRS_IGPU_MEMORY_FRACTION", "0.75"))
        except ValueError:
            frac = 0.75
        total = int(ram_total * frac)
        return {"kind": "VRAM", "total_bytes": total, "available_bytes": min(total, ram_avail),
                "budget_bytes": int(min(total, ram_avail) * BUDGET_FRACTION), "ram_budget_bytes": 0}
    return {"kind": "RAM", "total_bytes": ram_total, "available_bytes": ram_avail,
            "budget_bytes": int(ram_avail * BUDGET_FRACTION), "ram_budget_bytes": 0}



# ----------------------------------------------------------------------------- analysis


def level_bits(registry: Any) -> dict[str, tuple[float, float]]:
    """{level: (bits per weight, bits of its sensitive-tensor type)} for the installed levels."""
    specs = {s.name: s for s in registry.quantizers if s.isq and s.bits_per_weight}
    out = {}
    for name, *_ in LEVELS:
        spec = specs.get(name)
        if spec is not None:
            sensitive = specs.get(spec.sensitive or name, spec)
            out[name] = (float(spec.bits_per_weight), float(sensitive.bits_per_weight))
    return out


def weight_bytes(params: dict[str, int], bits: tuple[float, float] | None, dtype_bits: float) -> int:
    """Bytes of the weights: matrices at `bits` = (bpw, sensitive bpw), or all in the dtype (None)."""
    if bits is None:
        return int(sum(params.values()) * dtype_bits / 8)
    total = (params["linear"] * bits[0]
             + (params["embedding"] + params["lm_head"]) * bits[1]
             + params["other"] * dtype_bits)
    return int(total / 8)


def analyse(shape: dict[str, Any], memory: dict[str, Any], *, dtype_bits: float, kv_itemsize: int,
            max_context: int, gpu: bool, bits: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    kv = shape["kv"]
    kv_per_token = kv_elements_per_token(kv)
    kv_per_token *= kv_itemsize
    need_ctx = min(MIN_CONTEXT, max_context)
    options = []
    for name, label, quality in LEVELS:
        if name != "none" and name not in bits:
            continue  # no installed quantizer provides it
        level = bits.get(name)
        size = weight_bytes(shape["params"], level, dtype_bits)
        room_bytes = memory["budget_bytes"] - size - RUNTIME_RESERVE_BYTES
        tokens = max(0, room_bytes // kv_per_token) if kv_per_token else max_context
        room = int(min(tokens, max_context))
        if room >= need_ctx:
            status = "fits"
        elif gpu and size + RUNTIME_RESERVE_BYTES + need_ctx * kv_per_token <= (
                memory["budget_bytes"] + memory.get("ram_budget_bytes", 0)):
            status = "hybrid"
        else:
            status = "too_large"
        options.append({
            "quant": name,
            "label": label,
            "bits_per_weight": level[0] if level is not None else dtype_bits,
            "size_bytes": size,
            "memory_share": size / memory["total_bytes"] if memory["total_bytes"] else None,
            "context_room": room,
            "context_room_is_max": room >= max_context,
            "quality": quality,
            "status": status,
            "fits": status == "fits",
            "recommended": False,
        })
    return options


def recommend(options: list[dict[str, Any]], profile: str, max_context: int) -> dict[str, Any] | None:
    fits = {o["quant"]: o for o in options if o["fits"]}
    order = [n for n, *_ in LEVELS]
    if profile == "quality":
        return next((fits[n] for n in order if n in fits), None)
    if profile == "fast":
        return next((fits[n] for n in ("q4k", "q3k", "q2k") if n in fits), None)
    quantized = [n for n in order if n != "none"]
    want = min(BALANCED_CONTEXT, max_context)
    return next((fits[n] for n in quantized if n in fits and fits[n]["context_room"] >= want),
                next((fits[n] for n in quantized if n in fits), None))


def serve_command(args: argparse.Namespace, quant: str | None) -> str:
    parts = ["mistralrs", "serve"]
    if args.kind != "auto":
        parts.append(args.kind)
    parts += ["-m", shlex.quote(args.model_id)]
    if quant and quant != "none":
        parts += ["--isq", quant]
    if args.dtype != "auto":
        parts += ["--dtype", args.dtype]
    if args.cpu:
        parts.append("--cpu")
    return " ".join(parts)


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def toml_config(args: argparse.Namespace, quant: str | None) -> str:
    """A `mistralrs from-config` file (reference §2.8) serving the model with `quant`."""
    lines = ['command = "serve"', "", "[server]", 'host = "0.0.0.0"', "port = 1234", "",
             "[runtime]", "max_seqs = 32", "", "[[models]]"]
    if args.kind != "auto":
        lines.append(f"kind = {_toml_str(args.kind)}")
    lines.append(f"model_id = {_toml_str(args.model_id)}")
    lines.append(f"dtype = {_toml_str(args.dtype)}")
    if quant and quant != "none":
        lines += ["", "[models.quantization]", f"in_situ_quant = {_toml_str(quant)}"]
    if args.cpu:
        lines += ["", "[models.device]", "cpu = true"]
    return "\n".join(lines) + "\n"


def collect(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mistralrs.dtypes import dtype_name, resolve_dtype
    from mistralrs.errors import MistralRsError
    from mistralrs.plugins import get_registry
    from mistralrs.serving import pick_device

    registry = get_registry()
    config, source = _config_for(args)
    device = pick_device(registry, cpu=args.cpu)
    dtype = resolve_dtype(args.dtype, device)
    dtype_bits = DTYPE_BITS.get(str(dtype).removeprefix("torch."), 16)
    notes: list[str] = []
    try:
        shape = meta_shape(config, args.arch, dtype, registry)
    except MistralRsError:
        shape = formula_shape(config)
        archs = config.get("architectures") or [config.get("model_type") or "?"]
        notes.append(f"no installed architecture builds {', '.join(map(str, archs))}: "
                     "sizes are estimated with a Llama-style formula over config.json")
    kv_itemsize = 1 if args.pa_cache_type == "f8e4m3" else torch.empty((), dtype=dtype).element_size()
    c = text_config(config)
    max_context: int = args.max_seq_len or _int(c, "max_position_embeddings", "n_positions", "seq_length",
                                                "max_sequence_length") or 4096
    memory = detect_memory(device)
    options = analyse(shape, memory, dtype_bits=dtype_bits, kv_itemsize=kv_itemsize,
                      max_context=max_context, gpu=device != "cpu", bits=level_bits(registry))
    for opt in options:
        if opt["quant"] == "none":
            opt["label"] = f"None ({dtype_name(dtype).upper()})"
    per_profile = {p: (r["quant"] if (r := recommend(options, p, max_context)) else None) for p in PROFILES}
    chosen = per_profile[args.profile]
    for opt in options:
        opt["recommended"] = opt["quant"] == chosen
    quantizers = {n.lower() for q in registry.quantizers if q.isq for n in (q.name, *q.aliases)}
    if chosen not in (None, "none") and chosen not in quantizers:
        notes.append(f"no installed quantizer plugin provides {chosen} yet: the recommended command needs one "
                     f"(installed: {', '.join(sorted(quantizers)) or 'none'})")
    from mistralrs.prequantized import describe_checkpoint

    published = describe_checkpoint(config, registry)
    if published:
        notes.append(f"the checkpoint is pre-quantized: {published}; --isq re-quantizes it (dequantized) at load")
    if chosen is None:
        notes.append("no quantization level fits this machine with a usable context"
                     + ("" if device == "cpu" else "; try --cpu to use system RAM"))
    kv = shape["kv"]
    kv_per_token = kv_elements_per_token(kv)
    device_map = propose_device_map(args, shape, options, chosen, device, memory, max_context, notes)
    return {
        "model_id": args.model_id,
        "config": source,
        "profile": args.profile,
        "backend": device,
        "dtype": dtype_name(dtype),
        "memory": memory,
        "parameters": sum(shape["params"].values()),
        "parameter_groups": shape["params"],
        "size_method": shape["method"],
        "kv_bytes_per_token": kv_per_token * kv_itemsize,
        "max_context": max_context,
        "candidates": options,
        "recommended_isq": chosen,
        "recommended_per_profile": per_profile,
        "recommended_command": serve_command(args, chosen) if chosen else None,
        "isq_available": sorted(quantizers),
        "prequantized": published,
        "device_map": device_map,
        "notes": notes,
    }


def propose_device_map(args: argparse.Namespace, shape: dict[str, Any], options: list[dict[str, Any]],
                       chosen: str | None, device: str, memory: dict[str, Any], max_context: int,
                       notes: list[str]) -> dict[str, Any] | None:
    """The automatic device map (`device_map.auto_plan`) for the recommended level on this
    machine's GPUs, or on ``--plan-devices``; and the -tp sizes the heads allow."""
    from mistralrs import device_map as dm
    from mistralrs.errors import ConfigError

    sizes = shape.get("sizes")
    if sizes is None:
        return None
    tp = dm.tensor_parallel_sizes(sizes.num_heads, int(shape["kv"].get("num_kv_heads") or 1))
    result: dict[str, Any] = {"tensor_parallel_sizes": tp, "max_seq_len": args.max_seq_len or 4096,
                              "max_batch_size": getattr(args, "max_batch_size", 1) or 1}
    if args.plan_devices:
        caps = dm.parse_capacities(args.plan_devices)
    elif device != "cpu":
        caps = dm.free_memory(dm.accelerators(device))
    else:
        result["plan"] = None
        return result
    none = next((o for o in options if o["quant"] == "none"), None)
    pick = next((o for o in options if o["quant"] == chosen), None) if chosen else None
    if none is not None and pick is not None and none["size_bytes"]:
        sizes = dm.scaled(sizes, pick["size_bytes"] / none["size_bytes"], quantized=chosen != "none")
    try:
        plan = dm.auto_plan(sizes, caps, max_seq_len=result["max_seq_len"], max_batch_size=result["max_batch_size"],
                            cpu_free_bytes=memory.get("ram_budget_bytes") or memory.get("available_bytes"))
    except ConfigError as exc:
        notes.append(f"device map: {exc}")
        result["plan"] = None
        return result
    result.update(devices=[{"device": c.device, "free_bytes": c.free_bytes} for c in caps], plan=plan.summary(),
                  device_layers=None if plan.trivial else dm.device_layers_spec(plan), quant=chosen)
    return result


# ----------------------------------------------------------------------------- output


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


def _context(opt: dict[str, Any]) -> str:
    n = opt["context_room"]
    base = f"{n // 1000}k" if n >= 1000 else str(n)
    return f"{base} (max)" if opt["context_room_is_max"] else base


def _status(opt: dict[str, Any], plain: bool) -> str:
    text = {"fits": ("✅", "Fits"), "hybrid": ("⚠️", "Hybrid"), "too_large": ("❌", "Too Large")}[opt["status"]]
    if opt["recommended"]:
        text = ("🚀", "Recommended" + (" (Hybrid)" if opt["status"] == "hybrid" else ""))
    return text[1] if plain else f"{text[0]} {text[1]}"


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def print_report(report: dict[str, Any], emit_config: str | None) -> None:
    from mistralrs.cli._table import _use_ascii, render_table

    plain = _use_ascii()
    mem = report["memory"]
    print()
    print("Tuning Analysis")
    print("===============")
    print()
    print(f"Model: {report['model_id']}")
    print(f"Profile: {report['profile'].capitalize()}")
    print(f"Backend: {report['backend']}")
    print(f"Total {mem['kind']}: {mem['total_bytes'] / 1e9:.1f} GB ({mem['available_bytes'] / 1e9:.1f} GB available)")
    print(f"Parameters: {_params(report['parameters'])} ({report['size_method']}); "
          f"KV cache {report['kv_bytes_per_token'] / 1024:.1f} KiB/token ({report['dtype']}); "
          f"max context {report['max_context']}")
    print()
    for note in report["notes"]:
        print(f"[INFO] {note}")
    if report["notes"]:
        print()
    print("Quantization Options")
    print("--------------------")
    rows = [[o["label"], _size(o["size_bytes"]),
             f"{100 * o['memory_share']:.0f}%" if o["memory_share"] is not None else "?",
             _context(o), o["quality"], _status(o, plain)] for o in report["candidates"]]
    print(render_table(["Quant", "Est. Size", f"{mem['kind']} %", "Context Room", "Quality", "Status"], rows))
    print()
    print("Recommended Command")
    print("-------------------")
    if report["recommended_command"] is None:
        print("  (none: the model does not fit; see the notes above)")
    else:
        if emit_config:
            print(f"  mistralrs from-config --file {shlex.quote(emit_config)}")
            print()
            print("Or equivalently:")
        print(f"  {report['recommended_command']}")
    print()
    others = ", ".join(f"{p} -> {q or 'none fits'}" for p, q in report["recommended_per_profile"].items()
                       if p != report["profile"])
    print(f"[INFO] Other profiles: {others}")
    dmap = report.get("device_map")
    if dmap:
        print()
        print("Device Map")
        print("----------")
        if dmap.get("plan"):
            rows = [[r["device"], r["layers"], r["dtype"]] for r in dmap["plan"]]
            print(render_table(["Device", "Layers", "Dtype"], rows))
            print(f"  -n {dmap['device_layers']}" if dmap.get("device_layers") else
                  "  everything fits the first device: no -n needed")
        else:
            print("  (CPU only: nothing to map; give --plan-devices to plan for GPUs)")
        print(f"  reserving KV and activations for --max-seq-len {dmap['max_seq_len']} x "
              f"--max-batch-size {dmap['max_batch_size']}")
        print(f"  tensor parallel sizes the heads allow: {', '.join(map(str, dmap['tensor_parallel_sizes']))}")


def run(args: argparse.Namespace) -> int:
    from mistralrs.errors import ConfigError

    for name in ("quant", "isq"):
        if str(getattr(args, name, None) or "").strip().lower() == "auto":
            raise ConfigError(f"--{name} auto is meaningless for `tune`; tune is the recommender")
    report = collect(args)
    if args.emit_config:
        path = Path(args.emit_config).expanduser()
        try:
            if path.parent != Path(""):
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(toml_config(args, report["recommended_isq"]), encoding="utf-8")
        except OSError as exc:
            from mistralrs.errors import MistralRsError

            raise MistralRsError(f"cannot write --emit-config {path}: {exc.strerror or exc}") from exc
        report["emitted_config"] = str(path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, args.emit_config)
        if args.emit_config:
            print(f"Wrote config to {report['emitted_config']}")
    return 0
