"""`mistralrs uqff report|verify|inspect -m DIR [--quant Q]`: look at UQFF exports without loading
a model (docs/uqff.md). ``-m`` is an export directory (or one of its shards) or a Hub repository
(its .uqff files, residual and config are fetched)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{report,verify,inspect}")
    for name, help_text in (("report", "print (or --write) a uqff_report.json made from the files"),
                            ("verify", "check an export the way the loader does, without loading a model"),
                            ("inspect", "list every layer record: module, stored type, shape, shard")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-m", "--model-id", required=True, help="export directory, a shard in it, or a Hub repo id")
        p.add_argument("--quant", help="the shard set: a type (q4k), a bit count (4), a stem, or all (default)")
        p.add_argument("--revision", help="Hub revision")
        p.add_argument("--json", action="store_true", help="JSON instead of text")
        if name == "report":
            p.add_argument("--write", action="store_true", help="write uqff_report.json beside the shards")
            p.add_argument("--base-model", help="base model id recorded in a written report")
        if name == "verify":
            p.add_argument("--strict", action="store_true", help="also want uqff_report.json and no fallback layers")
            p.add_argument("--allow-newer-minor", action="store_true",
                           help="accept same-major files with a newer minor version")


def _directory(args: argparse.Namespace) -> Path:
    local = Path(args.model_id).expanduser()
    if local.exists():
        return local
    from mistralrs.hub import fetch_model, repo_file_names

    names = repo_file_names(args.model_id, ".uqff", revision=args.revision)
    files = fetch_model(args.model_id, revision=args.revision, require_weights=False,
                        extra_files=[*names, "residual.safetensors"])
    return Path(files.root)


def run(args: argparse.Namespace) -> int:
    from mistralrs.uqff import inspect as I

    directory = _directory(args)
    out: Any
    if args.action == "report":
        out = I.report_for(directory, args.quant)
        if args.base_model:
            out["base_model"] = args.base_model
        if args.write:
            target = (directory.parent if directory.is_file() else directory) / "uqff_report.json"
            target.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {target}", file=sys.stderr)
        if args.json or not args.write:
            if args.json:
                print(json.dumps(out, indent=2))
            else:
                for o in out["outputs"]:
                    counts = ", ".join(f"{n} {t}" for t, n in sorted(o["actual_counts"].items()))
                    print(f"{o['quant']}: {o['layers']} layers in {len(o['shards'])} shard(s) ({counts})")
        return 0
    if args.action == "verify":
        problems, summary = I.verify(directory, args.quant, strict=args.strict, allow_newer_minor=args.allow_newer_minor)
        if args.json:
            print(json.dumps({"ok": not problems, "problems": problems, "outputs": summary}, indent=2))
        else:
            for stem, s in summary.items():
                print(f"{stem}: {s['layers']} layers in {len(s['shards'])} shard(s): OK")
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            print("verified" if not problems else f"{len(problems)} problem(s)", file=sys.stderr)
        return 0 if not problems else 1
    rows = [r for paths in I.shard_groups(directory, args.quant).values() for r in I.describe(paths)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max((len(r["module"]) for r in rows), default=10)
        for r in rows:
            print(f"{r['module']:<{width}}  {r['stored']:<8} {'x'.join(map(str, r['shape'])):<16} {r['file']}")
    return 0
