"""Each native extension's build key covers every file its sources include: a header left out of HEADERS
would let an edited build reuse a stale cached library."""

from __future__ import annotations

import os
import re

import pytest

from mistralrs_plugins.kernels.cpu_ggml_quantize import ops as ggml_quantize_ops
from mistralrs_plugins.kernels.cpu_native import ops as native_ops
from mistralrs_plugins.kernels.cpu_quant import ops as quant_ops

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@pytest.mark.parametrize("mod", [quant_ops, native_ops, ggml_quantize_ops], ids=["cpu_quant", "cpu_native", "cpu_ggml_quantize"])
def test_the_build_key_covers_every_local_include(mod):
    root = mod.source_dir()
    listed = set(mod.SOURCES) | set(mod.HEADERS)
    todo, seen = list(mod.SOURCES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for inc in _LOCAL_INCLUDE.findall((root / name).read_text()):
            key = os.path.normpath(os.path.join(os.path.dirname(name), inc))
            assert key in listed, f"{mod.__name__}: {name} includes {inc}, which HEADERS does not list"
            todo.append(key)
