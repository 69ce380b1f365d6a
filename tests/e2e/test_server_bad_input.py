"""Bad input over HTTP gets a 400 naming the field, and never disturbs anyone else: each case
here once crashed a step, failed every request in flight, or froze the server (issue 11)."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from tests.e2e.test_server import error_of, http

NAN = float("nan")


def raw(body: dict) -> bytes:
    # Python's JSON writer emits NaN/Infinity literals, as some clients do; the server parses them.
    return json.dumps(body).encode()


class Neighbour:
    """A streaming request running while the bad ones arrive: it must finish normally."""

    def __init__(self, url: str) -> None:
        self.result: tuple[int, bytes] | None = None
        body = {"messages": "keep streaming", "max_tokens": 60, "ignore_eos": True, "stream": True,
                "logprobs": True}
        self.thread = threading.Thread(target=lambda: setattr(self, "result", http(url, body)[::2]))
        self.thread.start()

    def check(self) -> None:
        self.thread.join(120)
        status, body = self.result
        text = body.decode()
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]


BAD_FIELDS = [
    ("temperature", NAN), ("top_p", NAN), ("min_p", NAN), ("presence_penalty", NAN), ("frequency_penalty", NAN),
    ("repetition_penalty", NAN), ("repetition_penalty", 0), ("repetition_penalty", 1e300), ("dry_multiplier", NAN),
    ("dry_base", NAN), ("temperature", math.inf), ("logprobs", "yes"), ("top_logprobs", 2.5),
    ("logit_bias", {"100000000000000000000000": 1}), ("logit_bias", {"5": NAN}), ("logit_bias", {"-3": 1}),
    ("logit_bias", {"abc": 1}),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_bad_sampling_values_get_a_400_naming_the_field(server, field, value):
    neighbour = Neighbour(server.url + "/v1/chat/completions")
    for path, extra in (("/v1/chat/completions", {"messages": "hi"}), ("/v1/completions", {"prompt": "hi"})):
        status, _, body = http(server.url + path, raw=raw({**extra, "max_tokens": 5, field: value}))
        err = error_of(body)
        assert status == 400 and err["param"] == field and err["type"] == "invalid_request_error", err
    neighbour.check()


def test_concurrent_logprobs_and_plain_requests_both_finish(server):
    url = server.url + "/v1/chat/completions"
    results: dict[str, tuple[int, bytes]] = {}
    bodies = {"lp": {"messages": "a", "max_tokens": 20, "logprobs": True, "ignore_eos": True},
              "plain": {"messages": "b", "max_tokens": 10, "ignore_eos": True}}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, http(url, bodies[k])[::2])) for k in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    lp, plain = (json.loads(results[k][1]) for k in ("lp", "plain"))
    assert results["lp"][0] == results["plain"][0] == 200
    assert len(lp["choices"][0]["logprobs"]["content"]) == lp["usage"]["completion_tokens"] == 20
    assert plain["choices"][0]["logprobs"] is None and plain["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize("payload", [
    b'{"messages": "hi", "x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
    b'{"messages": "hi", "x": ' + b"[" * 200 + b"]" * 200 + b"}",  # parses, but past the depth cap
], ids=["100k-objects", "50k-arrays", "200-arrays"])
def test_deeply_nested_json_is_a_400(server, payload):
    status, _, body = http(server.url + "/v1/chat/completions", raw=payload)
    err = error_of(body)
    assert status == 400 and err["code"] == "invalid_json" and "nested deeper than" in err["message"]


def test_deeply_nested_tool_call_arguments_are_a_400(server):
    args = "[" * 5000 + "]" * 5000
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "f", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    status, _, body = http(server.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert status in (200, 400), body  # kept as a string, or refused: never a 500


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server, tiny_service):
    calls = []
    encode = tiny_service.tokenizer.encode
    tiny_service.tokenizer.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        status, _, body = http(server.url + "/v1/chat/completions", {"messages": "word " * 2_000_000})
    finally:
        tiny_service.tokenizer.encode = encode
    err = error_of(body)
    assert status == 400 and err["type"] == "exceed_context_size_error" and "at least" in err["message"]
    assert calls == [] and err["n_ctx"] == 512


def test_the_server_answers_while_a_long_prompt_is_tokenized(server):
    """A long prompt kept by truncate_sequence is tokenized; /health must answer meanwhile."""
    done = threading.Event()
    latencies: list[float] = []

    def long_request() -> None:
        http(server.url + "/v1/completions", {"prompt": "lorem ipsum dolor sit amet " * 80_000,
                                              "truncate_sequence": True, "max_tokens": 1})
        done.set()

    start = time.perf_counter()
    thread = threading.Thread(target=long_request)
    thread.start()
    while not done.is_set():
        t0 = time.perf_counter()
        assert http(server.url + "/health", timeout=120)[0] == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.01)
    thread.join()
    total = time.perf_counter() - start
    # Relative, not absolute: the slowest health check took a small part of the long request.
    assert len(latencies) >= 3 and max(latencies) < 0.5 * total, (max(latencies), total)


def test_the_openapi_document_and_the_validator_agree(server):
    """Every numeric bound the served document states is the one the server enforces."""
    doc = json.loads(http(server.url + "/openapi.json")[2])
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    checked = 0
    for field, schema in props.items():
        if schema.get("type") not in ("number", "integer") or field in ("n", "max_tokens", "max_completion_tokens"):
            continue
        step = 1 if schema["type"] == "integer" else 0.5
        inside, outside = [], []
        if "minimum" in schema:
            inside.append(schema["minimum"])
            outside.append(schema["minimum"] - step)
        if "exclusiveMinimum" in schema:
            inside.append(schema["exclusiveMinimum"] + (1 if schema["type"] == "integer" else 0.01))
            outside.append(schema["exclusiveMinimum"])
        if "maximum" in schema:
            inside.append(schema["maximum"])
            outside.append(schema["maximum"] + step)
        for value in inside:
            status, _, body = http(server.url + "/v1/chat/completions",
                                   {"messages": "hi", "max_tokens": 1, field: value})
            assert status == 200, (field, value, body)
        for value in outside:
            status, _, body = http(server.url + "/v1/chat/completions",
                                   {"messages": "hi", "max_tokens": 1, field: value})
            assert status == 400 and error_of(body)["param"] == field, (field, value, body)
        checked += bool(inside or outside)
    assert checked >= 10  # temperature, top_p, min_p, the penalties, DRY, top_logprobs ...
