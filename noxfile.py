"""Developer sessions. `nox` runs `tests` by default.

Every session installs torch==2.13.0 first: on CPU-only machines that is the local CPU
build, and asking pip for plain `torch` would pull a multi-GB CUDA build instead."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"


def install(session: nox.Session, *extra: str, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]", *extra)


@nox.session
def tests(session: nox.Session) -> None:
    """The fast suite (the default; what CI runs)."""
    install(session)
    session.install("-e", "contrib/mistralrs-calculator")
    session.install("-e", "examples/mistralrs-example-plugin")
    session.run("pytest", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """The long suites (marked slow): full-size models, the server soak and the API fuzzer."""
    install(session, extras="dev,stress")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def triton(session: nox.Session) -> None:
    """The Triton kernels under the interpreter (TRITON_INTERPRET=1; triton is the `cuda` extra, ~170 MB)."""
    install(session, extras="dev,cuda")
    session.run("pytest", "-m", "slow or not slow", "tests/plugins/test_triton_kernels.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "core", "plugins", "tests", "contrib", "examples", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session)
    session.run("mypy", "core/mistralrs")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print tokens/s and GB/s, write JSON under benchmarks/results/."""
    install(session)
    for script in ("load_memory.py", "sampling.py", "constraints.py", "linear_bf16.py", "constrained_decode.py", "engine_speed.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)


@nox.session
def contrib(session: nox.Session) -> None:
    """Install the third-party template plugin with pip and prove it is discovered and used."""
    install(session)
    session.install("contrib/mistralrs-calculator")
    session.run("pytest", "tests/e2e/test_contrib_plugin.py", *session.posargs)
