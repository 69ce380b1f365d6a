"""`--imatrix` and `--calibration-file` end to end: through `run` and `quantize` (the written
layers differ from plain ISQ's where importance applies), and bad input exits 2."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.tiny_models import write_tiny_llama
from tests.helpers.uqff_files import read_uqff

TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen liquor jugs. " * 8) * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("imatrix-e2e") / "llama", hidden_size=256, intermediate_size=512)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MISTRALRS_NO_PROGRESS": "1"}


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "mistralrs", *argv], capture_output=True, text=True, timeout=300,
                          env=_env())


def _legacy_imatrix(path, layers=2, hidden=256, inter=512):
    """A llama.cpp legacy .imatrix with a strongly skewed importance for every projection."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(layers):
        for key, n in (("attn_q", hidden), ("attn_k", hidden), ("attn_v", hidden), ("attn_output", hidden),
                       ("ffn_gate", hidden), ("ffn_up", hidden), ("ffn_down", inter)):
            entries.append((f"blk.{i}.{key}.weight", rng.exponential(1.0, n).astype(np.float32) ** 3))
    out = [struct.pack("<i", len(entries))]
    for name, values in entries:
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", 1, len(values)), values.tobytes()]
    path.write_bytes(b"".join(out))
    return path


def test_quantize_with_calibration_or_imatrix_changes_the_weighted_layers(model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    imatrix = _legacy_imatrix(tmp_path / "m.imatrix")
    runs = {}
    for label, extra in (("plain", []), ("calib", ["--calibration-file", str(text)]),
                         ("imatrix", ["--imatrix", str(imatrix)])):
        r = _cli("quantize", "-m", str(model_dir), "--isq", "q4k,q8_0", *extra, "-o", str(tmp_path / label))
        assert r.returncode == 0, r.stderr
        runs[label] = {t: read_uqff(tmp_path / label / f"{t}-0.uqff") for t in ("q4k", "q8_0")}
    key = "model.layers.0.mlp.down_proj"
    for label in ("calib", "imatrix"):
        assert not np.array_equal(runs[label]["q4k"][key]["weight"].numpy(), runs["plain"]["q4k"][key]["weight"].numpy())
        # q8_0 ignores importance, as llama.cpp's does
        assert np.array_equal(runs[label]["q8_0"][key]["weight"].numpy(), runs["plain"]["q8_0"][key]["weight"].numpy())


def test_run_with_calibration(model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    r = _cli("run", "-m", str(model_dir), "--isq", "q4k", "--calibration-file", str(text), "-i", "hello",
             "--max-tokens", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@pytest.mark.parametrize("argv,needle", [
    (["--isq", "q4k", "--imatrix", "a.imatrix", "--calibration-file", "b.txt"], "--imatrix and --calibration-file conflict"),
    (["--imatrix", "a.imatrix"], "--imatrix guides in-situ quantization; give --isq TYPE"),
    (["--isq", "q4k", "--imatrix", "missing.imatrix"], "--imatrix missing.imatrix: no such file"),
])
def test_bad_imatrix_input_exits_2(model_dir, argv, needle):
    r = _cli("run", "-m", str(model_dir), *argv, "-i", "x")
    assert r.returncode == 2 and needle in r.stderr, r.stderr
