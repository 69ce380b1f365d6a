"""Pre-quantized checkpoints end to end: a GPTQ and an AWQ checkpoint through `mistralrs run`,
`Runner` and the HTTP server, and `--isq` on top of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.packed_checkpoints import write_packed
from tests.helpers.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("preq-e2e")
    src = write_tiny_llama(root / "llama", hidden_size=256, intermediate_size=512)
    gptq, _ = write_packed(src, root / "gptq", "gptq", bits=4, group_size=128, sym=True)
    awq, _ = write_packed(src, root / "awq", "awq", group_size=64, sym=False)
    return gptq, awq


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "mistralrs", "run", *argv, "-i", "hello", "--max-tokens", "5",
                           "--temperature", "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_cli_runs_gptq_and_awq_and_isq_on_top(checkpoints):
    for path in checkpoints:
        r = _run("-m", str(path))
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = _run("-m", str(checkpoints[1]), "--isq", "q4k")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_runner_and_server_serve_a_gptq_checkpoint(checkpoints):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from mistralrs.nn.linear import describe_methods
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    runner = Runner(Which.Plain(model_id=str(checkpoints[0]), dtype="f32"))
    try:
        assert describe_methods(runner.service.loaded.model) == {"gptq (q4_0)": 14, "unquantized": 1}
        want = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.0)).choices[0].message.content
        srv = start_server(runner.service)
        try:
            status, _, body = http(srv.url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == want
        finally:
            srv.stop()
    finally:
        runner.shutdown()
