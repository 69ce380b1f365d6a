"""The OpenAI server frontend against a scripted fake engine (vLLM's engine-mock pattern):
exact assertions on ids, chunk order, keep-alives, disconnect -> cancel, errors, auth,
CORS, metrics, the Responses API and draining, with no model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from mistralrs.engine.engine import ChoiceFinished, EngineError, RequestDone, RequestFailed, TokenDelta, Usage
from mistralrs.serving import ModelService
from mistralrs.tokenization import Tokenizer
from mistralrs_plugins.frontends.openai_server import app as server_app
from mistralrs_plugins.frontends.openai_server.app import OpenAIServer, ServerState, create_app
from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

MODEL = "fake/model"


# -- the fake engine and service ----------------------------------------------------------------
def usage(prompt: int = 5, completion: int = 2) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=0, time_to_first_token=0.01,
                 prompt_seconds=0.01, completion_seconds=0.02, total_seconds=0.03)


def script_for(texts: list[list[str]], *, finish: str = "stop", prompt: int = 5, delay: float = 0.0,
               logprobs: bool = False) -> list[Any]:
    """Events for choices whose token texts are `texts[i]`, interleaved by position."""
    events: list[Any] = []
    longest = max(len(t) for t in texts)
    for pos in range(longest):
        for i, toks in enumerate(texts):
            if pos < len(toks):
                if delay:
                    events.append(delay)
                lp = ((100 + pos, -0.5, ((100 + pos, -0.5), (7, -1.5))),) if logprobs else ()
                events.append(TokenDelta(i, toks[pos], (100 + pos,), lp))
    finished = [ChoiceFinished(i, finish, "".join(t), tuple(range(len(t)))) for i, t in enumerate(texts)]
    events += finished
    events.append(RequestDone(usage(prompt, sum(len(t) for t in texts)), tuple(finished)))
    return events


class FakeHandle:
    def __init__(self, engine: FakeEngine, request: Any, loop: asyncio.AbstractEventLoop, script: list[Any]):
        self.engine, self.request, self.id = engine, request, f"fake-{len(engine.handles)}"
        self.done = False
        self.cancelled = False
        self.cancel_event = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = loop.create_task(self._play(script))

    async def _play(self, script: list[Any]) -> None:
        for item in script:
            if isinstance(item, (int, float)):
                await asyncio.sleep(item)
                continue
            if self.cancelled:
                return
            if isinstance(item, (RequestDone, RequestFailed)):
                self.done = True
            self._queue.put_nowait(item)

    def cancel(self) -> None:
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self.cancel_event.set()
        self.engine.cancelled.append(self)
        self._task.cancel()
        n = self.request.n
        finished = tuple(ChoiceFinished(i, "canceled", "", ()) for i in range(n))
        for f in finished:
            self._queue.put_nowait(f)
        self.done = True
        self._queue.put_nowait(RequestDone(usage(), finished))

    async def __aiter__(self):
        try:
            while True:
                event = await self._queue.get()
                yield event
                if isinstance(event, (RequestDone, RequestFailed)):
                    return
        finally:
            if not self.done:
                self.cancel()


class FakePool:
    num_blocks = 100
    hits = 64
    queries = 2

    def num_used(self) -> int:
        return 12


class FakeScheduler:
    pool = FakePool()


class FakeEngine:
    num_running = 3
    num_waiting = 1
    scheduler = FakeScheduler()

    def __init__(self, script: Callable[[Any], list[Any]]) -> None:
        self.script = script
        self.handles: list[FakeHandle] = []
        self.cancelled: list[FakeHandle] = []
        self.requests: list[Any] = []

    def submit(self, request: Any, *, loop: asyncio.AbstractEventLoop | None = None) -> FakeHandle:
        self.requests.append(request)
        handle = FakeHandle(self, request, loop or asyncio.get_running_loop(), list(self.script(request)))
        self.handles.append(handle)
        return handle

    def kv_blocks(self) -> tuple[int, int]:
        return 12, 100


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


class FakeService:
    model_id = MODEL
    max_model_len = 64

    def __init__(self, tokenizer: Tokenizer, script: Callable[[Any], list[Any]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.engine = FakeEngine(script or (lambda req: script_for([["Hello", " world"]] * req.n)))
        self.rendered: list[list[dict]] = []
        self.shut_down = False

    def render_chat(self, messages, *, tools=None, add_generation_prompt=True, **kw) -> str:
        self.rendered.append([dict(m) for m in messages])
        return "".join(f"<{m['role']}>{m.get('content') or ''}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    def encode_chat(self, messages, **kwargs) -> list[int]:
        return self.tokenizer.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    # The real service's prompt handling (it needs only the tokenizer and max_model_len).
    encode_prompt = ModelService.encode_prompt
    encode_completion = ModelService.encode_completion
    truncate = ModelService.truncate

    def shutdown(self) -> None:
        self.shut_down = True


# -- helpers ------------------------------------------------------------------------------------
def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@contextlib.asynccontextmanager
async def client_for(service: Any, **state_kw: Any):
    state_kw.setdefault("keep_alive", 10.0)
    state = ServerState(model_id=MODEL, service=service, **state_kw)
    app = create_app(state)
    async with TestClient(TestServer(app, handler_cancellation=True)) as client:
        client.state = state
        yield client


def sse_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def data_events(text: str) -> list[Any]:
    out = []
    for line in sse_lines(text):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat(messages: Any = "hi", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, **kw}


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.01)


# -- registration -------------------------------------------------------------------------------
def test_registration_is_cheap_and_registers_frontend_and_command():
    import subprocess
    import sys

    code = ("import sys, mistralrs_plugins.frontends.openai_server as m; "
            "print('torch' in sys.modules, 'aiohttp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    from mistralrs.specs import resolve
    from mistralrs_plugins.frontends import openai_server

    frontends, commands = [], []

    class Cli:
        def add_command(self, spec):
            commands.append(spec)

    openai_server.register_frontends(frontends.append)
    openai_server.register_commands(Cli())
    assert [f.name for f in frontends] == ["openai_server"] and [c.name for c in commands] == ["serve"]
    assert resolve(frontends[0].factory) is OpenAIServer
    import argparse

    parser = argparse.ArgumentParser()
    resolve(commands[0].add_arguments)(parser)
    args = parser.parse_args(["text", "-m", "x"])
    assert (args.kind, args.port, args.host, args.api_key, args.max_seqs) == ("text", 1234, "0.0.0.0", None, 32)
    assert parser.parse_args(["-m", "x", "-p", "9", "--host", "127.0.0.1", "--api-key", "k"]).port == 9


# -- chat completions ---------------------------------------------------------------------------
def test_chat_non_streaming_shape_ids_and_headers(tokenizer):
    async def body():
        svc = FakeService(tokenizer)
        async with client_for(svc) as c:
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=5), headers={"x-request-id": "abc-1"})
            assert r.status == 200
            assert r.headers["x-request-id"] == "abc-1"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            data = await r.json()
            assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
            assert data["model"] == MODEL
            (choice,) = data["choices"]
            assert choice["message"] == {"role": "assistant", "content": "Hello world", "tool_calls": None,
                                         "reasoning_content": None}
            assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
            assert data["usage"]["prompt_tokens"] == 5 and data["usage"]["completion_tokens"] == 2
            assert data["usage"]["total_tokens"] == 7
            # A generated request id when none is sent; "default" names the served model.
            r2 = await c.post("/v1/chat/completions", json=chat(model="default"))
            assert r2.status == 200 and len(r2.headers["x-request-id"]) >= 16
            assert (await r2.json())["id"] != data["id"]
            gen = svc.engine.requests[0]
            assert gen.max_tokens == 5 and gen.n == 1
            assert svc.rendered[0] == [{"role": "user", "content": "hi"}]

    run(body())


def test_chat_stream_contract(tokenizer):
    async def body():
        async with client_for(FakeService(tokenizer)) as c:
            r = await c.post("/v1/chat/completions", json=chat(stream=True, n=2))
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = data_events(await r.text())
            assert events[-1] == "[DONE]"
            chunks = events[:-1]
            assert len({ch["id"] for ch in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
            assert all(ch["object"] == "chat.completion.chunk" and len(ch["choices"]) == 1 for ch in chunks)
            for index in (0, 1):
                mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == index]
                assert mine[0]["delta"]["role"] == "assistant"
                assert all(m["delta"]["role"] is None for m in mine[1:])
                assert [m["finish_reason"] for m in mine].count("stop") == 1
                assert mine[-1]["finish_reason"] == "stop" and mine[-1]["delta"]["content"] is None
                assert "".join(m["delta"]["content"] or "" for m in mine) == "Hello world"
            # Choices interleave: both started before either finished.
            order = [ch["choices"][0]["index"] for ch in chunks]
            assert order[:2] == [0, 1]
            assert all(ch["usage"] is None for ch in chunks)

    run(body())


def test_include_usage_adds_a_final_usage_chunk_and_stream_options_needs_stream(tokenizer):
    async def body():
        async with client_for(FakeService(tokenizer)) as c:
            r = await c.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
            events = data_events(await r.text())
            assert events[-1] == "[DONE]"
            last = events[-2]
            assert last["choices"] == [] and last["usage"]["total_tokens"] == 7
            assert all(e["usage"] is None for e in events[:-2])
            r = await c.post("/v1/chat/completions", json=chat(stream_options={"include_usage": True}))
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "stream_options"

    run(body())


def test_stream_logprobs_attach_to_chunks(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["Hel", "", "lo"]], logprobs=True))
        async with client_for(svc) as c:
            r = await c.post("/v1/chat/completions", json=chat(stream=True, logprobs=True, top_logprobs=2))
            chunks = [e for e in data_events(await r.text()) if e != "[DONE]"]
            content = "".join(ch["choices"][0]["delta"]["content"] or "" for ch in chunks)
            tokens = [t for ch in chunks if ch["choices"][0]["logprobs"]
                      for t in ch["choices"][0]["logprobs"]["content"]]
            assert content == "Hello" and "".join(t["token"] for t in tokens) == "Hello"
            assert len(tokens) == 3 and all(len(t["top_logprobs"]) == 2 for t in tokens)
            r = await c.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2))
            lp = (await r.json())["choices"][0]["logprobs"]["content"]
            assert [t["token"] for t in lp] == ["Hel", "", "lo"] and lp[0]["bytes"] == list(b"Hel")
            assert lp[0]["top_logprobs"][0] == {"token": 100, "logprob": -0.5, "bytes": None}

    run(body())


def test_keep_alive_comments_while_waiting(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: [0.35] + script_for([["Hi"]]))
        async with client_for(svc, keep_alive=0.1) as c:
            r = await c.post("/v1/chat/completions", json=chat(stream=True))
            lines = sse_lines(await r.text())
            first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
            assert lines[:first_data] and all(line == ": keep-alive" for line in lines[:first_data])
            assert 2 <= first_data <= 4
            assert lines[-1] == "data: [DONE]"

    run(body())


def test_client_disconnect_cancels_the_request(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["tok"] * 200], delay=0.02))
        async with client_for(svc) as c:
            # Streaming: read one chunk, then hang up.
            r = await c.post("/v1/chat/completions", json=chat(stream=True))
            line = await r.content.readline()
            assert line.startswith(b"data: ")
            r.close()
            await wait_for(lambda: len(svc.engine.cancelled) == 1)
            # Not streaming: the client gives up waiting.
            with pytest.raises(asyncio.TimeoutError):
                await c.post("/v1/chat/completions", json=chat(), timeout=aiohttp.ClientTimeout(total=0.2))
            await wait_for(lambda: len(svc.engine.cancelled) == 2)
            assert all(h.cancelled for h in svc.engine.handles)
            await wait_for(lambda: not c.state.handles)
            # The server still serves.
            svc.engine.script = lambda req: script_for([["ok"]])
            assert (await (await c.post("/v1/chat/completions", json=chat())).json())["choices"][0]["message"][
                "content"] == "ok"

    run(body())


def test_engine_failures(tokenizer):
    async def body():
        boom = EngineError("generation failed: RuntimeError: boom")
        svc = FakeService(tokenizer, lambda req: [RequestFailed(boom)])
        async with client_for(svc) as c:
            r = await c.post("/v1/chat/completions", json=chat())
            assert r.status == 500
            err = (await r.json())["error"]
            assert err["type"] == "server_error" and "boom" in err["message"]
            # Streaming, failing before the first byte: still a plain HTTP error.
            r = await c.post("/v1/chat/completions", json=chat(stream=True))
            assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"
            # Failing mid-stream: an error chunk, then [DONE].
            svc.engine.script = lambda req: [TokenDelta(0, "Hel", (1,)), RequestFailed(boom)]
            r = await c.post("/v1/chat/completions", json=chat(stream=True))
            assert r.status == 200
            events = data_events(await r.text())
            assert events[0]["choices"][0]["delta"]["content"] == "Hel"
            assert events[1] == {"error": {"message": str(boom), "type": "server_error", "param": None,
                                           "code": None}}
            assert events[2] == "[DONE]" and len(events) == 3
            # A first token that released no text yet (half a UTF-8 character) still starts the stream with
            # the role chunk, so a failure after it is an error event, not a 500.
            svc.engine.script = lambda req: [TokenDelta(0, "", (1,)), RequestFailed(boom)]
            r = await c.post("/v1/chat/completions", json=chat(stream=True))
            assert r.status == 200
            events = data_events(await r.text())
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            assert not events[0]["choices"][0]["delta"]["content"]
            assert events[1]["error"]["type"] == "server_error" and events[2] == "[DONE]"
            # And the server keeps serving.
            svc.engine.script = lambda req: script_for([["fine"]])
            r = await c.post("/v1/chat/completions", json=chat())
            assert r.status == 200

    run(body())


@pytest.mark.parametrize("payload, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    (b"", 400, None, "invalid_json"),
    (chat(model="gpt-4"), 404, "model", "model_not_found"),
    (chat(model=7), 400, "model", None),
    ({"model": MODEL}, 400, "messages", None),
    (chat(messages=[{"content": "no role"}]), 400, "messages", None),
    (chat(messages=[{"role": "user", "content": 123}]), 400, "messages", None),
    (chat(temperature=3), 400, "temperature", None),
    (chat(top_p="x"), 400, "top_p", None),
    (chat(max_tokens=0), 400, "max_tokens", None),
    (chat(n=0), 400, "n", None),
    (chat(stop=[1]), 400, "stop", None),
    (chat(logit_bias={"a": 1}), 400, "logit_bias", None),
    (chat(top_logprobs=50, logprobs=True), 400, "top_logprobs", None),
    (chat(stream="yes"), 400, "stream", None),
    (chat(response_format={"type": "hiccup"}), 400, "response_format", None),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 123}}), 400,
     "response_format", None),
    (chat(grammar={"type": "regex", "value": "a+"}, response_format={"type": "text"}), 400, "grammar", None),
    (chat(grammar={"type": "sound", "value": "a+"}), 400, "grammar", None),
    (chat(tool_choice="required"), 400, "tool_choice", None),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function",
                                                                              "function": {"name": "g"}}),
     400, "tool_choice", None),
    (chat(tools=[{"type": "code_interpreter"}]), 400, "tools", None),
    (chat(max_tool_rounds=-1), 400, "max_tool_rounds", None),
    (chat(messages="x " * 200), 400, "messages", "exceed_context_size_error"),
])
def test_invalid_requests_are_400s_naming_the_param(tokenizer, payload, status, param, code):
    async def body():
        svc = FakeService(tokenizer)
        async with client_for(svc) as c:
            kw = {"data": payload, "headers": {"Content-Type": "application/json"}} if isinstance(payload, bytes) \
                else {"json": payload}
            r = await c.post("/v1/chat/completions", **kw)
            assert r.status == status
            err = (await r.json())["error"]
            assert set(err) >= {"message", "type", "param", "code"} and err["message"]
            assert err["param"] == param and err["code"] == code
            assert err["type"] == ("exceed_context_size_error" if code == "exceed_context_size_error"
                                   else {400: "invalid_request_error", 404: "not_found_error"}[status])
            if code == "exceed_context_size_error":
                assert err["n_ctx"] == 64 and err["n_prompt_tokens"] > 64
            assert not svc.engine.requests
            # Unknown fields are ignored, and the server keeps serving after any error.
            r = await c.post("/v1/chat/completions", json=chat(frobnicate=True, user="u", seed=3))
            assert r.status == 200

    run(body())


def test_routes_methods_and_body_limit(tokenizer):
    async def body():
        async with client_for(FakeService(tokenizer)) as c:
            r = await c.get("/v1/nothing")
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
            r = await c.get("/v1/chat/completions")
            assert r.status == 405 and "error" in await r.json()
            big = b'{"messages": "' + b"a" * (50 * 1024 * 1024) + b'"}'
            r = await c.post("/v1/chat/completions", data=big, headers={"Content-Type": "application/json"})
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
            r = await c.post("/v1/chat/completions", json=chat(truncate_sequence=True, messages="x " * 200,
                                                               max_tokens=4))
            assert r.status == 200
            for path in ("/", "/health"):
                r = await c.get(path)
                assert r.status == 200 and await r.text() == "OK"

    run(body())


def test_api_key_and_cors(tokenizer):
    async def body():
        async with client_for(FakeService(tokenizer), api_key="sekrit") as c:
            assert (await c.get("/health")).status == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
                r = await c.post("/v1/chat/completions", json=chat(), headers=headers)
                assert r.status == 401
                err = (await r.json())["error"]
                assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
                assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert (await c.get("/v1/models")).status == 401
            assert (await c.get("/metrics")).status == 401
            r = await c.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sekrit"})
            assert r.status == 200
            r = await c.get("/v1/models", headers={"x-api-key": "sekrit"})
            assert r.status == 200
            # CORS preflight needs no key.
            r = await c.options("/v1/chat/completions", headers={
                "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            allowed = r.headers["Access-Control-Allow-Headers"].lower()
            assert all(h in allowed for h in ("authorization", "content-type", "x-api-key", "x-request-id"))
            assert "x-request-id" in r.headers["Access-Control-Expose-Headers"]

    run(body())


def test_models_tokenize_detokenize(tokenizer):
    async def body():
        async with client_for(FakeService(tokenizer)) as c:
            data = await (await c.get("/v1/models")).json()
            assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["default", MODEL]
            assert data["data"][1]["owned_by"] == "local" and data["data"][1]["max_model_len"] == 64
            assert (await c.get(f"/v1/models/{MODEL}")).status == 200
            assert (await c.get("/v1/models/other")).status == 404
            r = await c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})
            out = await r.json()
            assert out["tokens"] == tokenizer.encode("hello world", add_special_tokens=False)
            assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 64
            r = await c.post("/detokenize", json={"tokens": out["tokens"]})
            assert (await r.json())["prompt"] == "hello world"
            r = await c.post("/tokenize", json={"messages": [{"role": "user", "content": "yo"}]})
            assert (await r.json())["tokens"] == tokenizer.encode("<user>yo<assistant>", add_special_tokens=False)
            r = await c.post("/detokenize", json={"tokens": [10 ** 9]})
            assert r.status == 400 and (await r.json())["error"]["param"] == "tokens"
            r = await c.post("/tokenize", json={"prompt": 5})
            assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"

    run(body())


# -- completions ----------------------------------------------------------------------------------
def test_completions_echo_suffix_logprobs_and_stream(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["Hel", "lo"]] * req.n, logprobs=True))
        async with client_for(svc) as c:
            r = await c.post("/v1/completions", json={"prompt": "Say:", "echo": True, "suffix": "!", "logprobs": 1})
            data = await r.json()
            assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
            (choice,) = data["choices"]
            assert choice["text"] == "Say:Hello!" and choice["finish_reason"] == "stop"
            assert choice["logprobs"]["tokens"] == ["Hel", "lo"] and choice["logprobs"]["text_offset"] == [4, 7]
            gen = svc.engine.requests[-1]
            assert gen.logprobs and gen.top_logprobs == 1
            r = await c.post("/v1/completions", json={"prompt": "Say:", "stream": True, "echo": True, "n": 2,
                                                      "stream_options": {"include_usage": True}})
            events = data_events(await r.text())
            assert events[-1] == "[DONE]" and events[-2]["usage"]["total_tokens"] == 9
            for i in (0, 1):
                texts = [e["choices"][0]["text"] for e in events[:-2] if e["choices"][0]["index"] == i]
                assert "".join(texts) == "Say:Hello"
            r = await c.post("/v1/completions", json={"prompt": ["a", "b"]})
            assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
            r = await c.post("/v1/completions", json={"prompt": "x", "best_of": 3, "stream": True})
            assert r.status == 400 and (await r.json())["error"]["param"] == "best_of"

    run(body())


# -- responses --------------------------------------------------------------------------------------
def test_responses_create_chain_get_delete(tokenizer):
    async def body():
        svc = FakeService(tokenizer)
        async with client_for(svc) as c:
            r = await c.post("/v1/responses", json={"model": MODEL, "input": "Hi", "instructions": "Be brief.",
                                                    "max_output_tokens": 9, "metadata": {"k": "v"}})
            first = await r.json()
            assert r.status == 200 and first["id"].startswith("resp_") and first["object"] == "response"
            assert first["status"] == "completed" and first["output_text"] == "Hello world"
            (item,) = first["output"]
            assert item["type"] == "message" and item["role"] == "assistant"
            assert item["content"][0] == {"type": "output_text", "text": "Hello world", "annotations": [],
                                          "logprobs": []}
            assert first["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                                      "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                                      "total_tokens": 7}
            assert first["metadata"] == {"k": "v"} and first["max_output_tokens"] == 9
            assert svc.rendered[-1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
            # Chaining: the stored conversation comes first; the old instructions do not carry over.
            r = await c.post("/v1/responses", json={"input": [{"role": "user", "content": [
                {"type": "input_text", "text": "And?"}]}], "previous_response_id": first["id"]})
            second = await r.json()
            assert second["previous_response_id"] == first["id"]
            assert svc.rendered[-1] == [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello world"},
                                        {"role": "user", "content": "And?"}]
            got = await (await c.get(f"/v1/responses/{first['id']}")).json()
            assert got["id"] == first["id"] and got["output_text"] == "Hello world"
            items = await (await c.get(f"/v1/responses/{first['id']}/input_items")).json()
            assert items["data"][0]["content"] == [{"type": "input_text", "text": "Hi"}]
            r = await c.delete(f"/v1/responses/{first['id']}")
            assert await r.json() == {"id": first["id"], "object": "response.deleted", "deleted": True}
            assert (await c.get(f"/v1/responses/{first['id']}")).status == 404
            assert (await c.delete(f"/v1/responses/{first['id']}")).status == 404
            r = await c.post("/v1/responses", json={"input": "x", "previous_response_id": first["id"]})
            assert r.status == 400 and (await r.json())["error"]["param"] == "previous_response_id"
            # store: false is not retrievable.
            r = await c.post("/v1/responses", json={"input": "x", "store": False})
            assert (await c.get(f"/v1/responses/{(await r.json())['id']}")).status == 404
            for bad, param in (({"input": []}, "input"), ({"input": [{"role": "user", "content": [
                    {"type": "input_image", "image_url": "x"}]}]}, "input"),
                    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
                    ({"input": "x", "n": 2}, "n")):
                r = await c.post("/v1/responses", json=bad)
                assert r.status == 400 and (await r.json())["error"]["param"] == param

    run(body())


def test_responses_stream_events(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["Hel", "lo"]], finish="length"))
        async with client_for(svc) as c:
            r = await c.post("/v1/responses", json={"input": "Hi", "stream": True, "max_output_tokens": 2})
            text = await r.text()
            names = [line[len("event: "):] for line in sse_lines(text) if line.startswith("event: ")]
            assert names == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added", "response.output_text.delta",
                             "response.output_text.delta", "response.output_text.done",
                             "response.content_part.done", "response.output_item.done", "response.incomplete"]
            events = data_events(text)
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            assert [e["type"] for e in events] == names
            assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello"
            final = events[-1]["response"]
            assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
            assert final["output"][0]["content"][0]["text"] == "Hello"
            assert "[DONE]" not in text
            stored = await (await c.get(f"/v1/responses/{final['id']}")).json()
            assert stored["output_text"] == "Hello"

    run(body())


# -- metrics and docs -----------------------------------------------------------------------------
def test_metrics_exposition(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["a", "b", "c"]], delay=0.01))
        async with client_for(svc) as c:
            await c.post("/v1/chat/completions", json=chat())
            await (await c.post("/v1/chat/completions", json=chat(stream=True))).text()
            await c.post("/v1/chat/completions", json=chat(model="nope"))
            await c.get("/health")
            # A request is counted just after its last byte: wait for the third.
            await wait_for(lambda: c.state.metrics.requests.get(
                method="POST", path="/v1/chat/completions", status="404") == 1)
            await wait_for(lambda: c.state.metrics.requests.get(
                method="POST", path="/v1/chat/completions", status="200") == 2)
            text = await (await c.get("/metrics")).text()
            assert 'http_requests_total{method="POST",path="/v1/chat/completions",status="200"} 2' in text
            assert 'http_requests_total{method="POST",path="/v1/chat/completions",status="404"} 1' in text
            assert "/health" not in text
            assert "mistralrs_time_to_first_token_seconds_count 2" in text
            assert "mistralrs_inter_token_latency_seconds_count 4" in text
            assert 'mistralrs_time_to_first_token_seconds_bucket{le="+Inf"} 2' in text
            assert "http_request_duration_seconds_count" in text
            for line in ("mistralrs_sequences_running 3", "mistralrs_sequences_waiting 1",
                         "mistralrs_kv_cache_blocks_used 12", "mistralrs_kv_cache_blocks_total 100",
                         "mistralrs_prefix_cache_hits_total 2", "mistralrs_prefix_cache_hit_tokens_total 64",
                         'mistralrs_sequences_completed_total{reason="stop"} 2', "mistralrs_model_loaded 1"):
                assert line in text.splitlines(), line
            for line in text.splitlines():
                assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2

    run(body())


def test_openapi_and_docs(tokenizer):
    async def body():
        async with client_for(FakeService(tokenizer), api_key="k") as c:
            doc = await (await c.get("/openapi.json")).json()
            assert doc["openapi"].startswith("3.") and doc["info"]["title"] == "mistralrs"
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/{response_id}",
                         "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"):
                assert path in doc["paths"], path
            assert set(doc["paths"]["/v1/responses/{response_id}"]) >= {"get", "delete"}
            schema = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
            assert schema["schema"]["$ref"] == "#/components/schemas/ChatCompletionRequest"
            assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
            page = await (await c.get("/docs")).text()
            assert "/v1/chat/completions" in page and "<table>" in page and "<script" not in page

    run(body())


# -- loading and draining -----------------------------------------------------------------------------
def test_503_while_loading_then_ready_and_load_failure(tokenizer):
    async def body():
        release = threading.Event()

        def loader():
            release.wait(10)
            return FakeService(tokenizer)

        srv = OpenAIServer(loader=loader, model_id=MODEL, host="127.0.0.1", port=0, announce=False)
        await srv.start()
        async with aiohttp.ClientSession() as s:
            r = await s.get(srv.url + "/health")
            assert r.status == 503 and (await r.json())["error"]["code"] == "model_loading"
            assert (await s.get(srv.url + "/")).status == 200  # alive, not ready
            r = await s.post(srv.url + "/v1/chat/completions", json=chat())
            assert r.status == 503
            err = (await r.json())["error"]
            assert err["type"] == "unavailable_error" and err["code"] == "model_loading"
            r = await s.get(srv.url + "/v1/models")  # answers while loading, with each model's status
            assert r.status == 200 and {m["status"] for m in (await r.json())["data"]} == {"loading"}
            r = await s.get(srv.url + f"/v1/models/{MODEL}")
            assert r.status == 200 and (await r.json())["status"] == "loading"
            release.set()
            await srv.wait_loaded()
            r = await s.post(srv.url + "/v1/chat/completions", json=chat())
            assert r.status == 200
            assert (await s.get(srv.url + "/health")).status == 200
        await srv.shutdown()
        assert srv.state.service.shut_down

        def broken():
            from mistralrs.errors import ModelLoadError

            raise ModelLoadError("no such model")

        srv = OpenAIServer(loader=broken, model_id=MODEL, host="127.0.0.1", port=0, announce=False)
        code = await srv.serve()  # returns once loading fails
        assert code == 1 and "no such model" in str(srv.state.load_error)

    run(body())


def test_shutdown_drains_in_flight_requests(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["x"] * 20], delay=0.02))
        srv = OpenAIServer(svc, host="127.0.0.1", port=0, announce=False)
        await srv.start()
        async with aiohttp.ClientSession() as s:
            r = await s.post(srv.url + "/v1/chat/completions", json=chat(stream=True))
            assert (await r.content.readline()).startswith(b"data: ")
            stopping = asyncio.ensure_future(srv.shutdown(timeout=5))
            await asyncio.sleep(0.05)
            # No new connections while draining ...
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as s2:
                    await s2.get(srv.url + "/health")
            # ... but the stream in flight runs to the end.
            rest = (await r.read()).decode()
            assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"stop"' in rest
            await stopping
        assert svc.shut_down and not svc.engine.cancelled

        # Past the timeout, what is left is cancelled.
        svc = FakeService(tokenizer, lambda req: script_for([["x"] * 500], delay=0.02))
        srv = OpenAIServer(svc, host="127.0.0.1", port=0, announce=False)
        await srv.start()
        async with aiohttp.ClientSession() as s:
            r = await s.post(srv.url + "/v1/chat/completions", json=chat(stream=True))
            await r.content.readline()
            await srv.shutdown(timeout=0.2)
            assert len(svc.engine.cancelled) == 1
            assert '"finish_reason":"canceled"' in (await r.read()).decode()

    run(body())


def test_keep_alive_interval_env(monkeypatch):
    monkeypatch.setenv("KEEP_ALIVE_INTERVAL", "250")
    assert server_app.keep_alive_seconds() == 0.25
    monkeypatch.delenv("KEEP_ALIVE_INTERVAL")
    assert server_app.keep_alive_seconds() == 10.0


def test_a_busy_port_is_a_clear_error(tokenizer, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        srv = OpenAIServer(FakeService(tokenizer), host="127.0.0.1", port=port)
        assert run(srv.serve()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_openapi_document_validates():
    validator = pytest.importorskip("openapi_spec_validator")
    from mistralrs_plugins.frontends.openai_server.openapi import openapi_document

    validator.validate(openapi_document())


def test_responses_logprobs_streamed_and_not(tokenizer):
    async def body():
        svc = FakeService(tokenizer, lambda req: script_for([["Hel", "", "lo"]], logprobs=True))
        async with client_for(svc) as c:
            r = await c.post("/v1/responses", json={"input": "Hi", "top_logprobs": 2})
            part = (await r.json())["output"][0]["content"][0]
            assert [lp["token"] for lp in part["logprobs"]] == ["Hel", "", "lo"]
            assert part["logprobs"][0]["top_logprobs"][0]["logprob"] == -0.5
            r = await c.post("/v1/responses", json={"input": "Hi", "top_logprobs": 2, "stream": True})
            events = data_events(await r.text())
            deltas = [e for e in events if e["type"] == "response.output_text.delta"]
            assert "".join(lp["token"] for d in deltas for lp in d["logprobs"]) == "Hello"
            assert "".join(d["delta"] for d in deltas) == "Hello"
            done = next(e for e in events if e["type"] == "response.output_text.done")
            assert len(done["logprobs"]) == 3

    run(body())
