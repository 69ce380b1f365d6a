"""`mistralrs login [--token TOKEN]`: save a Hugging Face token to `$HF_HOME/token`.

Without `--token` the token is read from the terminal without echo (getpass), or from the
first line of stdin when stdin is not a terminal (`echo $TOK | mistralrs login`). The file is
written atomically with mode 0600 and is what `--token-source cache` (the default) reads.
The token is never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="the token (non-interactive); default: prompt for it, or read stdin")


def _read_token() -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        return getpass.getpass("Enter your Hugging Face token (input hidden): ")
    if sys.stdin is None:
        return ""
    return sys.stdin.readline()


def save_token(token: str, path: Path) -> None:
    """Write `token` to `path` (mode 0600, parent directories created), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".token.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run(args: argparse.Namespace) -> int:
    from mistralrs.errors import ConfigError
    from mistralrs.hub import hf_home

    raw = args.token if args.token is not None else _read_token()
    token = (raw or "").strip()
    if not token:
        raise ConfigError("the token is empty; pass --token hf_... or paste it at the prompt "
                          "(create one at https://huggingface.co/settings/tokens)")
    if any(c.isspace() for c in token):
        raise ConfigError("the token contains whitespace; paste exactly the token (hf_...)")
    if not token.startswith("hf_"):
        print("mistralrs: warning: Hugging Face tokens usually start with 'hf_'; saving it anyway",
              file=sys.stderr)
    path = hf_home() / "token"
    try:
        save_token(token, path)
    except OSError as exc:
        from mistralrs.errors import MistralRsError

        raise MistralRsError(f"cannot write the token to {path}: {exc.strerror or exc}; "
                             "check the permissions of HF_HOME") from exc
    print(f"Token saved to {path}")
    if os.environ.get("HF_TOKEN", "").strip() or os.environ.get("HF_HUB_TOKEN", "").strip():
        print("Note: HF_TOKEN/HF_HUB_TOKEN is set in the environment and takes precedence over the saved token.")
    return 0
