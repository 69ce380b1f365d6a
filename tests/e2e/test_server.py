"""The server on a tiny real model over raw HTTP: the real `mistralrs serve` command in a
subprocess (loading, API key from the environment, SIGINT drain), and the wire-level
contracts a client library hides (SSE framing, malformed bodies, 413, metrics, tokenize)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest


def http(url: str, body: Any = None, *, method: str | None = None, headers: dict | None = None,
         raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def error_of(payload: bytes) -> dict:
    body = json.loads(payload)
    assert set(body) == {"error"}
    return body["error"]


# -- the real command ---------------------------------------------------------------------------
def test_serve_help_is_fast_and_lists_the_server_flags():
    out = subprocess.run([sys.executable, "-m", "mistralrs", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--port", "--host", "--api-key", "--shutdown-timeout", "-m MODEL_ID", "{auto,text,"):
        assert flag in out.stdout


def test_mistralrs_serve_subprocess_end_to_end(tiny_model_dir):
    env = {**os.environ, "MISTRALRS_API_KEY": "k3y", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistralrs", "serve", "text", "-m", str(tiny_model_dir), "--port", "0",
         "--host", "127.0.0.1", "--max-seqs", "4", "--shutdown-timeout", "20"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    try:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"serving (.+) on http://127\.0\.0\.1:(\d+)", line)
        assert m, f"unexpected first line {line!r}"
        url = f"http://127.0.0.1:{m.group(2)}"
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        assert http(url + "/")[0] == 200  # alive while loading
        auth = {"Authorization": "Bearer k3y"}
        deadline = time.time() + 60
        while True:  # 503 while loading, then 200
            status, _, body = http(url + "/health")
            if status == 200:
                break
            assert status == 503 and error_of(body)["code"] == "model_loading"
            assert time.time() < deadline
            time.sleep(0.1)
        status, _, body = http(url + "/v1/models", headers=auth)
        assert [m["id"] for m in json.loads(body)["data"]] == ["default", str(tiny_model_dir)]
        chat = {"model": "default", "messages": "hi", "max_tokens": 4}
        status, _, body = http(url + "/v1/chat/completions", chat)
        assert status == 401 and error_of(body)["type"] == "authentication_error"
        status, _, body = http(url + "/v1/chat/completions", chat, headers=auth)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1

        # A stream in flight when SIGINT arrives still runs to its end; then the process exits 0.
        req = urllib.request.Request(url + "/v1/chat/completions", headers={**auth, "Content-Type": "application/json"},
                                     data=json.dumps({"messages": "story", "max_tokens": 120, "stream": True,
                                                      "ignore_eos": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            first = r.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGINT)
            rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert rest.count('"finish_reason":"length"') == 1
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert "loaded; ready" in text and "SIGINT received" in text and "stopped" in text
    assert "warning" not in text.lower(), text  # e.g. torch's "Failed to initialize NumPy"


def test_serve_reports_a_model_that_cannot_load(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mistralrs", "serve", "-m", str(tmp_path / "missing"), "--port", "0",
                          "--host", "127.0.0.1"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0
    assert "could not load" in out.stderr


# -- wire-level contracts on the shared in-process server ----------------------------------------------
def test_sse_framing_and_request_ids(server):
    status, headers, body = http(server.url + "/v1/chat/completions",
                                 {"messages": "hi", "max_tokens": 5, "stream": True}, headers={"x-request-id": "r-42"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-request-id"] == "r-42" and headers["Access-Control-Allow-Origin"] == "*"
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"]) == 1


def test_malformed_bodies_and_limits(server):
    url = server.url + "/v1/chat/completions"
    status, _, body = http(url, raw=b'{"messages": "hi",')
    assert status == 400 and error_of(body)["code"] == "invalid_json"
    status, _, body = http(url, raw=b'"just a string"')
    assert status == 400 and "JSON object" in error_of(body)["message"]
    status, _, body = http(url, raw=b'{"messages": "' + b"a" * (50 * 1024 * 1024 + 10) + b'"}')
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    status, _, body = http(url, {"messages": "word " * 600, "stream": True})
    err = error_of(body)
    assert status == 400 and err["type"] == "exceed_context_size_error" and err["n_ctx"] == 512
    status, _, body = http(url, {"messages": "word " * 600, "truncate_sequence": True, "max_tokens": 3})
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] <= 512 - 3
    status, _, body = http(server.url + "/v1/no-such-route", {"input": "x"})
    assert status == 404 and error_of(body)["type"] == "not_found_error"
    assert http(url, {"messages": "fine", "max_tokens": 2})[0] == 200


def test_tokenize_detokenize_and_usage_agree(server):
    status, _, body = http(server.url + "/tokenize", {"prompt": "Hello world, again"})
    toks = json.loads(body)
    assert status == 200 and toks["count"] == len(toks["tokens"]) and toks["max_model_len"] == 512
    status, _, body = http(server.url + "/detokenize", {"tokens": toks["tokens"]})
    assert json.loads(body)["prompt"].endswith("Hello world, again")
    status, _, body = http(server.url + "/v1/completions", {"prompt": "Hello world, again", "max_tokens": 2})
    assert json.loads(body)["usage"]["prompt_tokens"] == toks["count"]


def test_metrics_count_requests_tokens_and_prefix_cache_hits(server):
    def scrape() -> dict[str, float]:
        text = http(server.url + "/metrics")[2].decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    before = scrape()
    shared = "A long shared system prompt that fills more than a couple of KV blocks. " * 3
    for question in ("one?", "two?"):
        body = {"messages": [{"role": "system", "content": shared}, {"role": "user", "content": question}],
                "max_tokens": 3, "stream": True, "ignore_eos": True}  # EOS first would send no token
        assert http(server.url + "/v1/chat/completions", body)[0] == 200
    # The server counts a request just after its last byte; give it a moment.
    key = 'http_requests_total{method="POST",path="/v1/chat/completions",status="200"}'
    deadline = time.time() + 5
    while (after := scrape())[key] - before.get(key, 0) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert after[key] - before.get(key, 0) == 2
    assert after["mistralrs_time_to_first_token_seconds_count"] - before["mistralrs_time_to_first_token_seconds_count"] == 2
    assert after["mistralrs_prefix_cache_hits_total"] > before["mistralrs_prefix_cache_hits_total"]
    assert after["mistralrs_prefix_cache_hit_tokens_total"] >= before["mistralrs_prefix_cache_hit_tokens_total"] + 16
    assert after["mistralrs_kv_cache_blocks_total"] == 32 * 512 // 16
    assert after["mistralrs_sequences_running"] == 0 and after["mistralrs_model_loaded"] == 1
    assert after["mistralrs_generation_tokens_total"] >= before.get("mistralrs_generation_tokens_total", 0) + 2


def test_openapi_and_docs_pages(server):
    status, headers, body = http(server.url + "/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"] == "3.1.0" and "/v1/responses" in doc["paths"]
    status, headers, body = http(server.url + "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"/v1/completions" in body


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health(server, path):
    assert http(server.url + path)[:3:2] == (200, b"OK")


def test_disconnect_cancels_generation_in_the_engine(server, tiny_service):
    import http.client

    host, port = server.url.removeprefix("http://").split(":")
    used_before = tiny_service.engine.kv_blocks()[0]
    cancelled_before = server.state.metrics.cancelled.get()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": "go on forever", "max_tokens": 400, "ignore_eos": True, "stream": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    assert tiny_service.engine.num_running == 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 10
    while tiny_service.engine.num_running and time.time() < deadline:
        time.sleep(0.02)
    assert tiny_service.engine.num_running == 0
    assert tiny_service.engine.kv_blocks()[0] <= used_before + 1  # its blocks went back (one may stay cached)
    assert server.state.metrics.cancelled.get() == cancelled_before + 1


def test_engine_failures_are_500s_then_the_server_recovers(server, tiny_service):
    engine = tiny_service.engine
    url = server.url + "/v1/chat/completions"
    steps = {"n": 0}

    def fail_at(step: int):
        def hook():
            steps["n"] += 1
            if steps["n"] == step:
                raise RuntimeError("injected failure")
        return hook

    # Earlier tests may leave cancelled requests finishing: count only this test's steps.
    deadline = time.time() + 30
    while (engine.num_running or engine.num_waiting) and time.time() < deadline:
        time.sleep(0.05)
    try:
        engine.fault_hook = fail_at(1)
        status, _, body = http(url, {"messages": "hi", "max_tokens": 5})
        err = error_of(body)
        assert status == 500 and err["type"] == "server_error" and "injected failure" in err["message"]
        steps["n"] = 0
        engine.fault_hook = fail_at(4)
        status, _, body = http(url, {"messages": "hi", "max_tokens": 50, "ignore_eos": True, "stream": True})
        events = [e for e in body.decode().split("\n\n") if e]
        assert status == 200 and events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert err["type"] == "server_error" and "injected failure" in err["message"]
        assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    finally:
        engine.fault_hook = None
    status, _, body = http(url, {"messages": "hi", "max_tokens": 3})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] is not None
