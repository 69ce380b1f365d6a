"""Triton kernels under the interpreter (``TRITON_INTERPRET=1``) on CPU tensors, for tests.

`interpreted(module)` imports a kernel module with the interpreter on: ``triton.jit`` decides at
decoration time whether a function is compiled or interpreted, triton's own library functions
(``tl.sum``, ...) included, so triton itself is imported again under the variable when something
imported it before without it, and then the module. Tests then keep ``TRITON_INTERPRET=1`` set while they call the kernels (the ops check it to
accept CPU tensors). Skips when triton is not installed.

The interpreter holds scalars as 1-element numpy arrays and turns them into Python ints with
``int(array)`` (a loop over ``range(start, end)`` with runtime bounds does that), which numpy 2.4 refuses
for arrays that are not 0-d: `interpreted` patches that one conversion (``_fix_scalar_index``).

`seeded(request)` gives a torch generator with fresh inputs each run, reproducible from the printed
``MISTRALRS_TEST_SEED``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import secrets
import sys
from types import ModuleType

import pytest
import torch

SHARED_JIT_MODULES = ("mistralrs_plugins.kernels.triton_fp8", "mistralrs_plugins.kernels.triton_ggml")
RUN_SEED = int(os.environ.get("MISTRALRS_TEST_SEED") or secrets.randbits(32))


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def _fix_scalar_index() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_mistralrs_index_fixed", False):
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, *scope):  # type: ignore[no-untyped-def]
        original(tensor, *scope)
        if not scope:  # older triton; versions that patch through a scope squeeze the array themselves
            tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = patch
    interpreter._mistralrs_index_fixed = True


def interpreted(module: str) -> ModuleType:
    if not triton_installed():
        pytest.skip("triton is not installed")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if "triton" in sys.modules and not _triton_interpreted():
            # Python modules only: the compiled extension (triton._C) cannot be initialized twice.
            for name in [m for m in sys.modules if (m == "triton" or m.startswith("triton."))
                         and not m.startswith("triton._C")]:
                del sys.modules[name]
        # The module and the shared @triton.jit helpers it imports (kernels/triton_fp8, triton_ggml): a helper
        # decorated without the interpreter cannot be called from an interpreted kernel.
        for name in (module, *SHARED_JIT_MODULES):
            sys.modules.pop(name, None)
        loaded = importlib.import_module(module)
        _fix_scalar_index()
        return loaded
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def seeded(request: pytest.FixtureRequest) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{RUN_SEED}:{request.node.nodeid}".encode()).digest()[:8], "little")
    print(f"MISTRALRS_TEST_SEED={RUN_SEED} (test seed {seed})")
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)
