"""Progress bars for long steps (loading weights, building models): shown on a terminal,
silent in pipes and logs. `MISTRALRS_NO_PROGRESS=1` turns them off everywhere."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO


def _enabled(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty()) and not os.environ.get("MISTRALRS_NO_PROGRESS")


def progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr when it is a terminal; otherwise a no-op with the same methods."""
    enabled = _enabled(sys.stderr)
    try:
        from tqdm.auto import tqdm  # a dependency of huggingface_hub
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        return _Silent()
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)


def no_progress() -> Any:
    """The no-op bar: for callers that show a bar only sometimes."""
    return _Silent()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


SPINNER_FRAMES = "|/-\\"


@contextlib.contextmanager
def spinner(desc: str, stream: TextIO | None = None, interval: float = 0.25) -> Iterator[None]:
    """For a step of unknown length (compiling kernels): `desc` with a spinner and the seconds
    elapsed, redrawn on one terminal line until the block ends, then erased. Silent when the
    stream is not a terminal (the caller logs a line instead)."""
    out = stream if stream is not None else sys.stderr
    if not _enabled(out):
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    def draw() -> None:
        frame = 0
        while not done.wait(interval if frame else 0):
            out.write(f"\r{SPINNER_FRAMES[frame % len(SPINNER_FRAMES)]} {desc} ({time.monotonic() - start:.0f} s)")
            out.flush()
            frame += 1
        out.write("\r\033[K")
        out.flush()

    thread = threading.Thread(target=draw, name="mistralrs-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
