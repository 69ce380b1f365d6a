"""Full-size checks (`nox -s slow` / `pytest -m slow`): a model of Llama-3.2-1B's shape with
dummy weights through the Python API and the CLI benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, "benchmarks")
    from engine_speed import LLAMA_3_2_1B

    from mistralrs.demo import demo_model_dir

    d = tmp_path_factory.mktemp("llama1b")
    (d / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((demo_model_dir() / name).read_bytes())
    return d


def test_full_size_model_serves_concurrent_requests(model_dir):
    from mistralrs import CompletionRequest, Runner, Which

    runner = Runner(which=Which.Plain(model_id=str(model_dir), dtype="bf16", dummy_weights=True), max_seqs=4,
                    pa_ctxt_len=4096)
    try:
        res = runner.send_completion_request(CompletionRequest(prompt="Hello world", max_tokens=8, n_choices=4,
                                                               temperature=0.8, ignore_eos=True, seed=1))
    finally:
        runner.shutdown()
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert res.usage.completion_tokens == 32


def test_bench_command_on_full_size_model(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "mistralrs", "bench", "-m", str(model_dir), "--dummy-weights", "--dtype", "bf16",
         "--prompt-len", "64", "--gen-len", "8", "--iterations", "1", "--warmup", "0", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "decode" in result.stdout
