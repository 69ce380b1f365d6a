"""`mistralrs from-config`: several models behind one server, routed by the `model` field."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers.tiny_models import write_tiny_llama


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fromcfg")
    a = write_tiny_llama(root / "a", seed=1)
    b = write_tiny_llama(root / "b", seed=2)
    port = free_port()
    cfg = root / "config.toml"
    cfg.write_text(f"""
command = "serve"
default_model_id = "{b}"
[server]
host = "127.0.0.1"
port = {port}
[runtime]
max_seqs = 4
[paged_attn]
context_len = 1024
[[models]]
model_id = "{a}"
dtype = "f32"
[[models]]
model_id = "{b}"
dtype = "f32"
""")
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs", "from-config", "-f", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:  # 503 (an OSError) until loaded
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not come up: " + (proc.stdout.read() if proc.stdout else ""))
    yield url, str(a), str(b)
    proc.terminate()
    proc.wait(30)


def test_models_are_listed(two_model_server):
    url, a, b = two_model_server
    status, body = call(url + "/v1/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["default", a, b]
    assert body["data"][0]["root"] == b  # default_model_id


def test_requests_route_by_model(two_model_server):
    url, a, b = two_model_server
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    outs = {}
    for model in (a, b, "default"):
        status, body = call(url + "/v1/chat/completions", {**req, "model": model})
        assert status == 200, body
        outs[model] = body["choices"][0]["message"]["content"]
        assert body["model"] == (b if model == "default" else model)
    assert outs["default"] == outs[b]
    assert outs[a] != outs[b]  # different weights, different answers
    status, body = call(url + "/v1/chat/completions", {**req, "model": "nope"})
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_bad_config_exits_2_naming_file_and_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[models]]\nmodel_id = "x"\n[runtime]\nmax_seqs = "many"\n')
    result = subprocess.run([sys.executable, "-m", "mistralrs", "from-config", "-f", str(cfg)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(cfg) in result.stderr and "[runtime] max_seqs" in result.stderr


@pytest.mark.parametrize("argv,needle", [
    (["run", "speech", "-m", "demo", "-i", "x"], "speech models need an architecture plugin"),
    (["serve", "-m", "demo", "--isq", "q4kk"], "--isq 'q4kk' is not a quantization type; choose one of"),
    (["serve", "-m", "demo", "--isq", "7"], "--isq 7: no quantization type answers to 7 bits on cpu"),
    (["run", "-m", "demo", "--from-uqff", "x.uqff", "--isq", "q4k", "-i", "x"], "--from-uqff and --isq conflict"),
    (["run", "-m", "demo", "--cpu", "-n", "0:4", "-i", "x"], "device ordinal 0 names a GPU"),
    (["run", "-m", "demo", "--lora", "a=b", "-i", "x"], "--lora is not supported yet"),
    (["quantize", "-m", "demo", "-o", "out/"], "quantize needs --isq TYPE"),
    (["serve", "-m", "demo", "--pa-context-len", "10", "--pa-memory-mb", "5"], "mutually exclusive"),
])
def test_pending_capabilities_fail_clearly(argv, needle):
    result = subprocess.run([sys.executable, "-m", "mistralrs", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert needle in result.stderr and result.stderr.count("\n") == 1
