"""Every per-request cap gives a 4xx naming the cap, on the OpenAI routes (OpenAI's error shape,
`param` the field) and on the Anthropic route (its envelope); the server keeps serving."""

from __future__ import annotations

import json

import pytest

from mistralrs.request_limits import MAX_MESSAGES, MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TOOLS
from tests.e2e.test_server import error_of, http

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
MANY_TOOLS = [{"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
              for i in range(MAX_TOOLS + 1)]

# (field, value, words the error must contain: the cap itself)
CHAT_LIMITS = [
    ("messages", [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1), [str(MAX_MESSAGES), "limit"]),
    ("n", MAX_N + 1, [str(MAX_N)]),
    ("max_tokens", 513, ["512", "context length"]),
    ("max_completion_tokens", 10_000, ["512", "context length"]),
    ("top_logprobs", 21, ["20"]),
    ("stop", ["s"] * (MAX_STOP_STRINGS + 1), [str(MAX_STOP_STRINGS), "limit"]),
    ("stop", ["s" * (MAX_STOP_STRING_CHARS + 1)], [str(MAX_STOP_STRING_CHARS), "limit"]),
    ("tools", MANY_TOOLS, [str(MAX_TOOLS), "limit"]),
]


@pytest.mark.parametrize("field,value,words", CHAT_LIMITS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(CHAT_LIMITS)])
def test_chat_limits_name_the_cap(server, field, value, words):
    body = {"messages": "hi", "max_tokens": 2, "logprobs": True, field: value}
    status, _, payload = http(server.url + "/v1/chat/completions", body)
    err = error_of(payload)
    assert status == 400 and err["param"] == field and all(w in err["message"] for w in words), err


COMPLETION_LIMITS = [("n", MAX_N + 1, str(MAX_N)), ("max_tokens", 600, "512"), ("logprobs", 21, "20"),
                     ("stop", ["s"] * (MAX_STOP_STRINGS + 1), str(MAX_STOP_STRINGS))]


@pytest.mark.parametrize("field,value,word", COMPLETION_LIMITS, ids=[f for f, _, _ in COMPLETION_LIMITS])
def test_completion_limits_name_the_cap(server, field, value, word):
    status, _, payload = http(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    err = error_of(payload)
    assert status == 400 and err["param"] == field and word in err["message"], err


ANTHROPIC_LIMITS = [
    ({"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, str(MAX_MESSAGES)),
    ({"max_tokens": 100_000}, "context length"),
    ({"stop_sequences": ["s"] * (MAX_STOP_STRINGS + 1)}, str(MAX_STOP_STRINGS)),
    ({"tools": [{"name": f"f{i}", "input_schema": {"type": "object"}} for i in range(MAX_TOOLS + 1)]}, str(MAX_TOOLS)),
]


@pytest.mark.parametrize("extra,word", ANTHROPIC_LIMITS, ids=["messages", "max_tokens", "stop_sequences", "tools"])
def test_anthropic_limits_name_the_cap(server, extra, word):
    body = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}
    status, _, payload = http(server.url + "/v1/messages", body)
    err = json.loads(payload)
    assert status == 400 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert word in err["error"]["message"], err


def test_body_cap_on_the_anthropic_route(server):
    status, _, payload = http(server.url + "/v1/messages", raw=b'{"x": "' + b"a" * (50 * 1024 * 1024 + 10) + b'"}')
    err = json.loads(payload)
    assert status == 413 and err["error"]["type"] == "request_too_large" and "50 MB" in err["error"]["message"]
    assert http(server.url + "/v1/chat/completions", {"messages": "hi", "max_tokens": 2})[0] == 200


def test_health_and_models_while_loading():
    """/health: 503 in OpenAI's shape (code model_loading) until loaded; /v1/models answers with
    each model's status meanwhile."""
    import threading

    from mistralrs_plugins.frontends.openai_server.app import OpenAIServer
    from tests.e2e.conftest import ServerThread

    release = threading.Event()
    failed = RuntimeError("no such model")

    def loader():
        release.wait(30)
        raise failed

    srv = ServerThread(OpenAIServer(loader=loader, model_id="m", host="127.0.0.1", port=0, announce=False))
    srv.thread.start()
    srv.call(srv.server.start())
    try:
        status, headers, payload = http(srv.url + "/health")
        err = error_of(payload)
        assert status == 503 and err["code"] == "model_loading" and err["type"] == "unavailable_error"
        assert headers.get("Retry-After") == "1"
        status, _, payload = http(srv.url + "/v1/models")
        assert status == 200 and [(m["id"], m["status"]) for m in json.loads(payload)["data"]] == [
            ("default", "loading"), ("m", "loading")]
        status, _, payload = http(srv.url + "/v1/messages", {"max_tokens": 2, "messages": [
            {"role": "user", "content": "x"}]})
        assert status == 503 and json.loads(payload)["error"]["type"] == "overloaded_error"
        release.set()
        with pytest.raises(RuntimeError):
            srv.call(srv.server.wait_loaded())
        status, _, payload = http(srv.url + "/health")
        assert status == 503 and error_of(payload)["code"] == "model_load_failed"
        assert {m["status"] for m in json.loads(http(srv.url + "/v1/models")[2])["data"]} == {"failed"}
    finally:
        srv.stop()
