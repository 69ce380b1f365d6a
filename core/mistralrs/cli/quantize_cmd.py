"""`mistralrs quantize`: write UQFF files (docs/uqff.md).

    mistralrs quantize -m MODEL --isq q4k -o out/model-q4k.uqff    # one type: out/model-q4k-0.uqff ...
    mistralrs quantize -m MODEL --isq q4k,q8_0 -o out/              # a directory: q4k-0.uqff, q8_0-0.uqff

Each type is an in-situ-quantized load of the model (layer by layer, so peak memory stays near
the quantized size), written straight from the loaded layers; the residual tensors and the
config/tokenizer files are written once. In directory mode a README model card is written
(unless ``--no-readme``) and the upload command printed. ``--topology`` pins and
``--isq-organization`` apply to every type.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mistralrs.cli.model_options import add_model_arguments
from mistralrs.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, runtime=False, several_isq=True)
    parser.add_argument("-o", "--output", required=True,
                        help="a .uqff file (one type) or a directory (shards named per type)")
    parser.add_argument("--no-readme", action="store_true", help="no README.md model card in directory mode")


def isq_types(values: list[str] | None, device_type: str, registry: object) -> list[str]:
    """The type names of repeated / comma-separated --isq values, in order, each once."""
    from mistralrs.quantization import resolve_isq_type

    names: list[str] = []
    for value in values or ():
        for part in value.split(","):
            if part.strip():
                name = resolve_isq_type(part, device_type=device_type, registry=registry).name
                if name not in names:
                    names.append(name)
    if not names:
        raise ConfigError("quantize needs --isq TYPE (e.g. --isq q4k, or --isq q4k,q8_0 with a directory -o)")
    return names


def run(args: argparse.Namespace) -> int:
    import gc

    from mistralrs.cli.model_options import options_from_args
    from mistralrs.hub import fetch_model
    from mistralrs.nn.kernels import device_type_of
    from mistralrs.plugins import get_registry
    from mistralrs.serving import isq_plan, load_quantized, pick_device, resolve_model_files, tokenizer_of
    from mistralrs.uqff.writer import plan_output, write_report, write_residual, write_shards

    registry = get_registry()
    device = pick_device(registry, cpu=args.cpu)
    types = isq_types(args.isq, device_type_of(device), registry)
    out = plan_output(args.output, types)
    if args.from_uqff:
        raise ConfigError("quantize reads the original weights; --from-uqff does not apply")
    outputs = []
    for i, qtype in enumerate(types):
        args.isq = qtype
        opts = options_from_args(args)
        files = resolve_model_files(opts, fetch_model)
        plan = isq_plan(opts, device, registry)
        loaded = load_quantized(files, opts, plan, device, registry, tokenizer=lambda o=opts, f=files: tokenizer_of(o, f.root))
        plan.log_summary()
        report = write_shards(loaded.model, out.directory, out.stems[qtype], quant=qtype, registry=registry,
                              targeted=plan.target_name)
        if i == 0:
            write_residual(loaded.model, out.directory, files.root, set(report["_covered"]))
        outputs.append(report)
        shards = ", ".join(report["shards"])
        fallbacks = f", {report['fallback_count']} fallback layer(s)" if report["fallback_count"] else ""
        print(f"{qtype}: {report['layers']} layers{fallbacks} -> {out.directory / report['shards'][0]}"
              f"{' (' + shards + ')' if len(report['shards']) > 1 else ''}", file=sys.stderr)
        del loaded
        gc.collect()
    base = None if Path(args.model_id).expanduser().exists() else args.model_id
    report_path = write_report(out.directory, outputs, base_model=base or Path(args.model_id).name,
                               readme=out.directory_mode and not args.no_readme)
    print(f"UQFF written to {out.directory} (report: {report_path.name})", file=sys.stderr)
    if out.directory_mode:
        repo = f"<your-user>/{Path(args.model_id.rstrip('/')).name}-UQFF"
        print(f"Upload with:\n  huggingface-cli upload {repo} {out.directory}", file=sys.stderr)
    first = out.directory / outputs[0]["shards"][0]
    print(f"Run with:\n  mistralrs run -m {out.directory} --from-uqff {first.name}", file=sys.stderr)
    return 0
