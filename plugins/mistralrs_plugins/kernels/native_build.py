"""Build machinery shared by the native CPU kernel plugins (`cpu_native`, `cpu_quant`, `cpu_ggml_quantize`).

A plugin's C++ sources are compiled on first use with ``torch.utils.cpp_extension.load`` into
``<platformdirs user cache>/mistralrs/kernels/<key>``, where ``key`` hashes the sources and headers,
the flags, the torch version and the Python version. A file lock serialises builds across
processes; a finished build is marked with ``BUILD_OK`` and later processes load the shared
library directly (no compiler or ninja needed after the first build). Each library registers its
ops with torch's dispatcher under a namespace named after its build (no Python bindings, so it
compiles in seconds).

Failure policy (`resolve`, once per process through the plugin's `LazyExtension`): when a build cannot
be made or loaded (no compiler, no ninja, an unsupported CPU, ``MISTRALRS_NO_NATIVE_KERNELS`` set), one
`NativeKernelWarning` names the reason and the plugin's ops fall back to torch for the rest of the
process. An op never raises because of the native path.

Importing this module is cheap (no torch): the plugins' registration modules use `native_disabled`
and `cpu_flags` from here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

DISABLE_ENV = "MISTRALRS_NO_NATIVE_KERNELS"
CPU_FEATURES_OFF_ENV = "MISTRALRS_CPU_FEATURES_OFF"
BUILD_LOCK_TIMEOUT_S = 900.0

T = TypeVar("T")


class NativeKernelWarning(RuntimeWarning):
    """Native CPU kernels could not be built or loaded; torch is used instead."""


def native_disabled() -> bool:
    """True when ``MISTRALRS_NO_NATIVE_KERNELS`` is set to anything but ``""``/``0``/``false``/``no``."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty when unreadable), minus those
    named in ``MISTRALRS_CPU_FEATURES_OFF`` (comma-separated /proc/cpuinfo names: ``avx512f`` makes every
    plugin pick what it picks on an AVX2-only CPU, ``amx_tile`` the AVX-512 kernels on a CPU with AMX;
    to compare instruction sets on one machine)."""
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = frozenset(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    off = {f.strip().lower() for f in os.environ.get(CPU_FEATURES_OFF_ENV, "").split(",") if f.strip()}
    return flags - off


def cache_root() -> Path:
    """Where builds live: ``<platformdirs user cache>/mistralrs/kernels``."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("mistralrs")) / "kernels"


def build_key(source_dir: Path, files: Sequence[str], cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """Hash of everything a binary depends on: its sources and headers, flags, torch and Python versions."""
    import torch

    h = hashlib.sha256()
    for name in files:
        h.update(name.encode())
        h.update((source_dir / name).read_bytes())
    h.update(repr((tuple(cflags), tuple(ldflags), torch.__version__, sys.version_info[:2], sys.platform)).encode())
    return h.hexdigest()[:16]


def load_library(library: Path) -> None:
    """Load a built library into the process: its ops appear under ``torch.ops.<its namespace>``."""
    import torch

    torch.ops.load_library(str(library))


def build_library(*, prefix: str, source_dir: Path, sources: Sequence[str], headers: Sequence[str] = (),
                  cflags: Sequence[str], ldflags: Sequence[str], root: Path, what: str,
                  verbose: bool = False) -> tuple[str, Path]:
    """Build (or load the cached build of) one extension and load it; returns ``(namespace, library)``.

    ``prefix`` names the extension (``<prefix>_<key>`` is both the library's name and the dispatcher
    namespace its ops register under, ``TORCH_EXTENSION_NAME``); ``what`` names it in the spinner and
    the log. Raises on failure (no compiler, no ninja, a compile error).
    """
    import filelock
    import torch

    from mistralrs.progress import spinner

    key = build_key(source_dir, tuple(sources) + tuple(headers), cflags, ldflags)
    name = f"{prefix}_{key}"
    build_dir = root / key
    build_dir.mkdir(parents=True, exist_ok=True)
    marker = build_dir / "BUILD_OK"
    # Another process may be building the same key: wait for it (bounded), then use its build.
    with filelock.FileLock(str(build_dir) + ".lock", timeout=BUILD_LOCK_TIMEOUT_S):
        library = build_dir / f"{name}.so"
        if marker.exists() and library.exists():
            load_library(library)
            return name, library
        from torch.utils import cpp_extension  # (~0.1 s to import: only when building)

        compiler = os.environ.get("CXX", "c++")
        if shutil.which((shlex.split(compiler) or ["c++"])[0]) is None:
            raise RuntimeError(f"no C++ compiler: {compiler!r} was not found (set CXX or install g++)")
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja was not found (pip install ninja)")
        # We hold the cross-process lock, so a `lock` baton left in the directory by torch is stale
        # (a build that was killed); torch would otherwise wait for it forever.
        (build_dir / "lock").unlink(missing_ok=True)
        # A terminal shows a spinner meanwhile; logs get an INFO line (this is no problem to warn about).
        log.info("building %s in %s (once; this takes a few seconds)", what, build_dir)
        t0 = time.perf_counter()
        with spinner(f"building {what} (once per machine)"):
            path = cpp_extension.load(
                name=name,
                sources=[str(source_dir / s) for s in sources],
                extra_cflags=list(cflags),
                extra_ldflags=list(ldflags),
                build_directory=str(build_dir),
                verbose=verbose,
                is_python_module=False,  # loads the library into torch.ops; returns its path
            )
        marker.write_text(f"torch {torch.__version__}\n")
        log.info("%s built in %.1f s", what, time.perf_counter() - t0)
        return name, Path(path)


def resolve(builder: Callable[[], T], unavailable: str | None, what: str,
            stacklevel: int = 2) -> tuple[T | None, str | None]:
    """Decide a plugin's native path once: ``(ops, None)`` when ``builder()`` succeeds, else
    ``(None, reason)`` after one `NativeKernelWarning` naming the reason. ``unavailable`` (a reason,
    e.g. the env switch or a missing CPU feature) skips the build. ``stacklevel`` is counted from the
    caller of `resolve`, as for `warnings.warn`."""
    ops: T | None = None
    failed = unavailable
    if failed is None:
        try:
            ops = builder()
        except Exception as exc:  # noqa: BLE001 - a compiler problem must never break inference
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            detail = " | ".join(ln.strip()[:200] for ln in lines[-2:])
            failed = f"{type(exc).__name__}: {detail}"
            log.debug("%s: build failed", what, exc_info=True)
    if failed is not None:
        warnings.warn(
            f"mistralrs {what} unavailable ({failed}); using torch for the rest of this process",
            NativeKernelWarning,
            stacklevel=stacklevel + 1,
        )
    return ops, failed


class LazyExtension(Generic[T]):
    """One plugin's extension, built (or loaded) on first use and decided once per process (`resolve`).

    ``builder`` builds it (raises on failure), ``unavailable`` gives the reason to skip the build (or None);
    both are called at most once per decision. ``stacklevel`` is counted as for `warnings.warn` called
    in the function that calls `native`: the warning points at the caller of the plugin's op.
    """

    def __init__(self, builder: Callable[[], T], unavailable: Callable[[], str | None], what: str,
                 stacklevel: int = 2) -> None:
        self._builder = builder
        self._unavailable = unavailable
        self.what = what
        self.stacklevel = stacklevel
        self._lock = threading.Lock()
        self.ext: T | None = None
        self.failed: str | None = None  # why the native path is off for this process (None: not decided / on)

    def get(self) -> T | None:
        """The loaded extension, building it on first call; None when the native path is off."""
        if self.ext is not None or self.failed is not None:
            return self.ext
        with self._lock:
            if self.ext is not None or self.failed is not None:
                return self.ext
            # +2: resolve's stacklevel counts from here (get), which `native` called.
            self.ext, self.failed = resolve(self._builder, self._unavailable(), self.what, self.stacklevel + 2)
            return self.ext

    def native(self) -> T | None:
        """`get` for the ops (cheap once decided); the warning of a failed build points at the op's caller."""
        return self.ext if self.ext is not None else (None if self.failed is not None else self.get())

    def status(self) -> dict[str, Any]:
        """For diagnostics: whether the native path is on, and why not."""
        return {"loaded": self.ext is not None, "failed": self.failed}

    def reset(self) -> None:
        """Forget the decision (tests): the next use builds again."""
        with self._lock:
            self.ext = None
            self.failed = None
