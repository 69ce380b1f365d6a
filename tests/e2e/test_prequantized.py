"""Pre-quantized checkpoints end to end: GPTQ, AWQ, HQQ and MXFP4 checkpoints through `mistralrs
run`, `Runner` and the HTTP server (HQQ and MXFP4 with the greedy text of the dequantized float
model), and `--isq` on top of one."""

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


@pytest.fixture(scope="module")
def hqq_and_mxfp4(tmp_path_factory):
    pytest.importorskip("hqq")
    from tests.helpers.packed_checkpoints import write_dequantized, write_hqq, write_mxfp4

    root = tmp_path_factory.mktemp("preq2-e2e")
    src = write_tiny_llama(root / "llama", hidden_size=256, intermediate_size=512)
    out = {}
    for fmt, (path, deq) in {"hqq": write_hqq(src, root / "hqq", nbits=4, axis=1),
                             "mxfp4": write_mxfp4(src, root / "mxfp4")}.items():
        out[fmt] = (path, write_dequantized(src, root / f"{fmt}-float", deq))
    return out


def test_cli_runs_hqq_and_mxfp4_with_the_dequantized_models_text(hqq_and_mxfp4):
    for path, float_path in hqq_and_mxfp4.values():
        r, want = _run("-m", str(path)), _run("-m", str(float_path))
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        assert r.stdout == want.stdout


def test_runner_and_server_serve_hqq_and_mxfp4(hqq_and_mxfp4):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from mistralrs.nn.linear import describe_methods
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    expected = {"hqq": "hqq4 (groups of 64 along axis 1)", "mxfp4": "mxfp4 (checkpoint)"}
    request = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.0)
    for fmt, (path, float_path) in hqq_and_mxfp4.items():
        texts = []
        for source in (path, float_path):
            runner = Runner(Which.Plain(model_id=str(source), dtype="f32"))
            try:
                texts.append(runner.send_chat_completion_request(ChatCompletionRequest(**request)).choices[0].message.content)
                if source == path:
                    assert describe_methods(runner.service.loaded.model) == {expected[fmt]: 14, "unquantized": 1}
                    srv = start_server(runner.service)
                    try:
                        status, _, body = http(srv.url + "/v1/chat/completions", request)
                        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == texts[0]
                    finally:
                        srv.stop()
            finally:
                runner.shutdown()
        assert texts[0] == texts[1], fmt  # the same greedy text as the dequantized float model
