"""Commands of mistral.rs's CLI whose capability this build does not have yet. They exist so
that scripts and users get a clear answer instead of "invalid choice"."""

from __future__ import annotations

import argparse

from mistralrs.errors import ConfigError


def add_uqff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["report", "verify", "inspect"])
    parser.add_argument("path", nargs="?", help="a UQFF file or directory")


def uqff(args: argparse.Namespace) -> int:
    raise ConfigError(f"uqff {args.action} is not supported yet in this build (UQFF files load with --from-uqff and "
                      "are written with `mistralrs quantize`; their uqff_report.json lists what they hold)")
