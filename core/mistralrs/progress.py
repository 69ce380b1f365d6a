"""Progress bars for long steps (loading weights, building models): shown on a terminal,
silent in pipes and logs. `MISTRALRS_NO_PROGRESS=1` turns them off everywhere."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr when it is a terminal; otherwise a no-op with the same methods."""
    enabled = sys.stderr.isatty() and not os.environ.get("MISTRALRS_NO_PROGRESS")
    try:
        from tqdm.auto import tqdm  # a dependency of huggingface_hub
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        return _Silent()
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
