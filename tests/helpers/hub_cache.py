"""A Hugging Face hub cache laid out as huggingface_hub writes it, for offline tests
(``HF_HUB_OFFLINE=1``): ``<cache>/models--org--name/{blobs,snapshots/<commit>,refs/main}``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache: Path, repo_id: str, files: dict[str, Path], *, commit: str = COMMIT) -> Path:
    """Copy `files` ({name in the repository: local file}) into the cache as blobs with relative
    symlinks from the snapshot; returns the snapshot directory."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo_dir / "blobs" / name.replace("/", "-").replace(".", "-")
        shutil.copy(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
