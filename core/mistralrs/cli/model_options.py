"""The model-loading flags shared by `run`, `serve`, `bench` and `tune` (names and defaults of
mistral.rs's CLI), and their translation to `ServiceOptions`. No torch import here."""

from __future__ import annotations

import argparse
from typing import Any, Callable

MODEL_KINDS = ("auto", "text", "multimodal", "vision", "embedding", "speech", "diffusion")

# Flags of mistral.rs's CLI whose capability this build does not have yet: they parse, and
# using one is a clear "not supported yet" error naming what it waits for.
PENDING_FLAGS: dict[str, str] = {
    "enable_lora": "LoRA adapters",
    "lora": "LoRA adapters",
    "xlora": "X-LoRA adapters",
}


def number(convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse `type=` that converts and checks a value; a bad one names what was expected."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = number(int, lambda v: v >= 0, "an integer >= 0")
_fraction = number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def add_model_arguments(parser: argparse.ArgumentParser, *, runtime: bool = True, max_seqs_default: int = 32,
                        several_isq: bool = False) -> None:
    parser.add_argument("kind", nargs="?", choices=MODEL_KINDS, default="auto", help="model type (default: auto)")
    src = parser.add_argument_group("model source")
    src.add_argument("-m", "--model-id", required=True,
                     help="Hugging Face model id, local directory, or `demo` (random-weight offline demo)")
    src.add_argument("-t", "--tokenizer", help="local tokenizer.json to use instead of the model's")
    src.add_argument("-a", "--arch", help="architecture (default: from config.json)")
    src.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"], help="weights dtype")
    src.add_argument("--revision", help="hub revision (branch, tag or commit)")
    src.add_argument("--token-source", default="cache",
                     help="HF token: cache | literal:TOKEN | env:VAR | path:FILE | none (default: cache)")
    src.add_argument("--dummy-weights", action="store_true",
                     help="random weights from config.json alone (benchmarks, offline demos)")
    dev = parser.add_argument_group("device")
    dev.add_argument("--cpu", action="store_true", help="force the CPU")
    dev.add_argument("--device", help="device type: cpu, cuda, mps (default: the best available; "
                                      "an unavailable one is an error)")
    dev.add_argument("--hf-cache", help="Hugging Face hub cache directory")
    dev.add_argument("--max-seq-len", type=_positive_int, help="context length (default: from config.json)")
    dev.add_argument("--max-batch-size", type=_positive_int, default=1, help="device-map planning (default 1)")
    dev.add_argument("-n", "--device-layers", help="manual layer split ORD:NUM;... (e.g. 0:16;1:16; cpu:8), "
                                                   "remaining layers on the CPU (docs/distributed.md)")
    dev.add_argument("--topology", help="per-layer ISQ (and device) YAML: ranges, indices, /regex/ selectors")
    fmt = parser.add_argument_group("format and quantization")
    fmt.add_argument("--format", choices=["plain", "gguf", "ggml"],
                     help="weights format (default: gguf when -m is a .gguf file or -f names one, else plain)")
    fmt.add_argument("-f", "--quantized-file", help="GGUF file(s) in the -m repository/directory, ;-separated")
    fmt.add_argument("--tok-model-id", help="HF repo/directory whose tokenizer and chat template a GGUF model uses "
                                            "(default: the GGUF metadata)")
    fmt.add_argument("--gqa", type=_positive_int, default=1,
                     help="grouped-query factor of a legacy GGML file: n_head / n_kv_head (8 for Llama 2 70B; "
                          "default 1)")
    fmt.add_argument("--quant", help="pick a GGUF file of the -m repository by level (4, q8, Q4_K_M ...); "
                                     "for a safetensors model, the --isq level")
    isq_help = ("in-situ quantization at load: q4_0 q4_1 q5_0 q5_1 q8_0 q8_1 q2k..q6k q8k hqq4 hqq8 afq2..afq8 fp8 "
                "f8q8, or a bit count 2 3 4 5 6 8 (case-insensitive)")
    if several_isq:
        fmt.add_argument("--isq", action="append", help=isq_help + "; several comma-separated or repeated")
    else:
        fmt.add_argument("--isq", help=isq_help)
    fmt.add_argument("--from-uqff", help="load UQFF shard(s) instead of the weights: a .uqff file in the -m "
                                         "directory/repository or a path (its -1, -2 ... siblings come along), "
                                         "a type such as q4k, or several ;-separated")
    fmt.add_argument("--isq-organization", choices=["default", "moqe"],
                     help="moqe: quantize only the routed experts of MoE models")
    fmt.add_argument("--imatrix", help="importance matrix for --isq: llama.cpp .imatrix / GGUF imatrix, or .cimatrix")
    fmt.add_argument("--calibration-file", help="a text run through the model at load to make the imatrix for --isq")
    ad = parser.add_argument_group("adapters (not supported yet in this build)")
    ad.add_argument("--enable-lora", action="store_true")
    ad.add_argument("--lora", action="append", metavar="ALIAS=SOURCE")
    ad.add_argument("--xlora", help="X-LoRA model id")
    pa = parser.add_argument_group("paged attention")
    pa.add_argument("--paged-attn", default="auto", choices=["auto", "on", "off"])
    pa.add_argument("--pa-context-len", type=_positive_int, help="size the KV pool for N tokens")
    pa.add_argument("--pa-memory-mb", type=_positive_int, help="size the KV pool in MB")
    pa.add_argument("--pa-memory-fraction", type=_fraction, help="size the KV pool as a fraction of memory")
    pa.add_argument("--pa-block-size", "--pa-blk-size", dest="pa_block_size", type=int, default=32,
                    choices=[8, 16, 32])
    pa.add_argument("--pa-cache-type", default="auto", choices=["auto", "f8e4m3"])
    pa.add_argument("--attention-backend", help="attention backend by name (default: best for the device)")
    if runtime:
        rt = parser.add_argument_group("runtime")
        rt.add_argument("--max-seqs", type=_positive_int, default=max_seqs_default,
                        help=f"max running sequences (default {max_seqs_default})")
        rt.add_argument("--max-num-batched-tokens", type=_positive_int, default=4096,
                        help="token budget per engine step (default 4096)")
        rt.add_argument("--no-kv-cache", action="store_true")
        rt.add_argument("--prefix-cache-n", type=_non_negative_int, default=16, help="0 disables prefix caching")
        rt.add_argument("-c", "--chat-template", help="chat template file (.json or .jinja)")
        rt.add_argument("-j", "--jinja-explicit", help="a .jinja chat template that overrides all others")
        rt.add_argument("--seed", type=int, help="sampling seed")
        dist = parser.add_argument_group("distributed (docs/distributed.md)")
        dist.add_argument("-tp", "--tensor-parallel-size", type=_positive_int, default=1,
                          help="split every layer over N ranks: N local worker processes, or the torchrun world")
        dist.add_argument("--data-parallel-size", "-dp", type=_positive_int, default=1,
                          help="N engine replica processes behind one server (load- and prefix-aware routing)")


def check_supported(args: argparse.Namespace) -> None:
    """Reject model kinds whose plugins are missing and flags whose capability is pending."""
    from mistralrs.errors import ConfigError

    kind = getattr(args, "kind", "auto") or "auto"
    if kind not in ("auto", "text"):
        from mistralrs.plugins import get_registry

        wanted = "vision" if kind == "multimodal" else kind
        if not any(s.kind_of_model == wanted for s in get_registry().architectures):
            raise ConfigError(
                f"{kind} models need an architecture plugin for {wanted} models, and none is installed "
                f"(`mistralrs plugins` lists what is); install one, or use `auto`/`text`"
            )
    for dest, capability in PENDING_FLAGS.items():
        value = getattr(args, dest, None)
        if value:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} is not supported yet in this build ({capability} is not implemented yet)")


def options_from_args(args: argparse.Namespace) -> Any:
    from mistralrs.serving import ServiceOptions

    check_supported(args)

    given = [f for f in ("pa_context_len", "pa_memory_mb", "pa_memory_fraction") if getattr(args, f, None) is not None]
    if len(given) > 1:
        from mistralrs.errors import ConfigError

        raise ConfigError(f"{' and '.join('--' + g.replace('_', '-') for g in given)} are mutually exclusive")
    kind = getattr(args, "kind", "auto") or "auto"
    opts = ServiceOptions(
        model_id=args.model_id,
        kind=kind if kind in ("text", "embedding") else "auto",
        arch=args.arch,
        dtype=args.dtype,
        cpu=args.cpu,
        device=getattr(args, "device", None),
        revision=args.revision,
        token_source=args.token_source,
        hf_cache=args.hf_cache,
        tokenizer_json=args.tokenizer,
        chat_template=getattr(args, "chat_template", None),
        jinja_explicit=getattr(args, "jinja_explicit", None),
        dummy_weights=args.dummy_weights,
        format=args.format,
        quantized_files=args.quantized_file or (),
        tok_model_id=args.tok_model_id,
        quant=args.quant,
        gqa=getattr(args, "gqa", None) or 1,
        isq=args.isq,
        isq_organization=args.isq_organization,
        topology=args.topology,
        from_uqff=getattr(args, "from_uqff", None) or (),
        imatrix=getattr(args, "imatrix", None),
        calibration_file=getattr(args, "calibration_file", None),
        max_seqs=getattr(args, "max_seqs", 32),
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", 4096),
        max_seq_len=args.max_seq_len,
        device_layers=getattr(args, "device_layers", None),
        max_batch_size=getattr(args, "max_batch_size", 1) or 1,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1) or 1,
        data_parallel_size=getattr(args, "data_parallel_size", 1) or 1,
        no_kv_cache=getattr(args, "no_kv_cache", False),
        prefix_cache_n=getattr(args, "prefix_cache_n", 16),
        seed=getattr(args, "seed", None),
        attention_backend=args.attention_backend,
        paged_attn=args.paged_attn,
        pa_blk_size=args.pa_block_size,
        pa_context_len=args.pa_context_len,
        pa_memory_mb=args.pa_memory_mb,
        pa_memory_fraction=args.pa_memory_fraction,
        pa_cache_type=args.pa_cache_type,
        log_file=getattr(args, "log", None),
    )
    if opts.device and not opts.cpu:
        from mistralrs.plugins import get_registry
        from mistralrs.serving import check_device

        check_device(get_registry(), opts.device)  # exit code 2 before anything loads
    if opts.device_layers:
        # a bad -n fails now, with exit code 2 (an ordinal on a CPU-only machine included)
        from mistralrs.device_map import parse_device_layers
        from mistralrs.nn.kernels import device_type_of
        from mistralrs.plugins import get_registry
        from mistralrs.serving import pick_device

        kind = device_type_of(pick_device(get_registry(), cpu=opts.cpu, device=opts.device))
        parse_device_layers(opts.device_layers, accelerator=None if kind == "cpu" else kind)
    if opts.quant:
        from mistralrs.gguf.files import preference

        preference(opts.quant)  # --quant auto / IQ levels: refused now, exit code 2
    if opts.isq or opts.topology:
        # A bad type or topology file fails now, with exit code 2, before anything loads.
        from mistralrs.plugins import get_registry
        from mistralrs.serving import isq_plan, pick_device

        registry = get_registry()
        isq_plan(opts, pick_device(registry, cpu=opts.cpu, device=opts.device), registry)
    return opts
