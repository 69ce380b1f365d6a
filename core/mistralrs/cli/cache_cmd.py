"""`mistralrs cache list` and `mistralrs cache delete -m ID`: the Hugging Face hub cache.

The cache directory is `--hf-cache`, else `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub` (see `mistralrs.hub.hub_cache_dir`). Listing uses huggingface_hub's
`scan_cache_dir`; sizes count each blob once, as `huggingface-cli scan-cache` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list cached models with their size and when they were last used",
                        description="List cached models with their size and when they were last used.")
    ls.add_argument("--hf-cache", help="Hugging Face hub cache directory (default: HF_HUB_CACHE or $HF_HOME/hub)")
    ls.add_argument("--json", action="store_true", help="print machine-readable JSON")
    rm = sub.add_parser("delete", help="delete one model (all its revisions) from the cache",
                        description="Delete one model (all its revisions) from the cache.")
    rm.add_argument("-m", "--model-id", required=True, help="the model to delete, e.g. Qwen/Qwen3-4B")
    rm.add_argument("--hf-cache", help="Hugging Face hub cache directory (default: HF_HUB_CACHE or $HF_HOME/hub)")


def _relative(ts: float | None, now: float | None = None) -> str:
    """'today', 'yesterday', '3 days ago', '2 weeks ago', ... (as mistral.rs prints it)."""
    if not ts:
        return "unknown"
    days = int(max(0.0, (now or time.time()) - ts) // 86400)
    if days == 0:
        return "today"
    if days == 1:
        return "yesterday"
    if days < 7:
        return f"{days} days ago"
    if days < 30:
        n = days // 7
        return f"{n} week{'s' if n > 1 else ''} ago"
    if days < 365:
        n = days // 30
        return f"{n} month{'s' if n > 1 else ''} ago"
    n = days // 365
    return f"{n} year{'s' if n > 1 else ''} ago"


def scan(cache_dir: Path) -> tuple[list[Any], list[str]]:
    """(cached model repos sorted by id, scan warnings). Missing cache directory -> no repos."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    if not cache_dir.is_dir():
        return [], []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return [], []
    repos = sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id.lower())
    # Only problems with model repos matter here (not stray files such as version.txt).
    return repos, [str(w) for w in info.warnings if "models--" in str(w)]


def _last_used(repo: Any) -> float | None:
    return max(filter(None, (repo.last_accessed, repo.last_modified)), default=None)


def run_list(args: argparse.Namespace) -> int:
    from mistralrs.cli._table import format_size, render_table
    from mistralrs.hub import hub_cache_dir

    cache_dir = hub_cache_dir(args.hf_cache)
    repos, warnings = scan(cache_dir)
    for w in warnings:
        print(f"mistralrs: warning: {w}", file=sys.stderr)
    total = sum(r.size_on_disk for r in repos)
    if args.json:
        print(json.dumps({
            "cache_dir": str(cache_dir),
            "models": [
                {
                    "model_id": r.repo_id,
                    "size_bytes": r.size_on_disk,
                    "files": r.nb_files,
                    "revisions": sorted(rev.commit_hash for rev in r.revisions),
                    "last_used": _last_used(r),
                    "path": str(r.repo_path),
                }
                for r in repos
            ],
            "total_bytes": total,
        }, indent=2))
        return 0
    print()
    print("HuggingFace Model Cache")
    print("-----------------------")
    print()
    if not repos:
        print("No cached models found.")
    else:
        rows = [[r.repo_id, format_size(r.size_on_disk), _relative(_last_used(r))] for r in repos]
        print(render_table(["Model", "Size", "Last Used"], rows))
        print()
        print(f"Total: {len(repos)} model{'' if len(repos) == 1 else 's'}, {format_size(total)}")
    print(f"Cache directory: {cache_dir}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from mistralrs.cli._table import format_size
    from mistralrs.errors import NotFoundError
    from mistralrs.hub import hub_cache_dir

    cache_dir = hub_cache_dir(args.hf_cache)
    wanted = args.model_id.strip()
    repos, _ = scan(cache_dir)
    found = [r for r in repos if r.repo_id == wanted]
    if not found:  # hub ids are case-insensitive; accept a unique case-insensitive match
        found = [r for r in repos if r.repo_id.lower() == wanted.lower()]
    if len(found) != 1:
        raise NotFoundError(
            f"model {wanted!r} is not in the Hugging Face cache at {cache_dir}; "
            "run `mistralrs cache list` to see the cached models"
        )
    repo = found[0]
    freed = repo.size_on_disk
    hashes = [rev.commit_hash for rev in repo.revisions]
    if hashes:
        from huggingface_hub import scan_cache_dir

        strategy = scan_cache_dir(cache_dir).delete_revisions(*hashes)
        freed = strategy.expected_freed_size
        strategy.execute()
    if Path(repo.repo_path).exists():  # no revisions left (or an interrupted download): remove the rest
        shutil.rmtree(repo.repo_path)
    print(f"Deleted {repo.repo_id} ({format_size(freed)} freed)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.cache_action == "list":
        return run_list(args)
    return run_delete(args)
