"""A `mistralrs serve` / `from-config` subprocess in tests: start it, wait until `/health` says
every model is loaded (it answers 503 while loading), stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest


def start(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mistralrs", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:  # every model loaded
                    return
        except OSError:  # refused while starting, 503 while loading
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the server did not come up: " + (proc.stdout.read() if proc.stdout else ""))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.communicate(timeout=60)
