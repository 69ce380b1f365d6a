"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) end to end, with
the official `anthropic` SDK as the client against the in-process server and its tiny
random-weight model: text, streaming events, forced tool use, tool results, thinking, stop
sequences, token counts, API keys, and errors in Anthropic's envelope."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

ADD = {"name": "add", "description": "Add two integers", "input_schema": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"]}}
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}
TOOLS = [ADD, WEATHER]
USER = [{"role": "user", "content": "Hi"}]


def client_for(server, **kw):
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=server.url, max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n") if ": " in line and not line.startswith(":"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def check_tool_use(block, tools=TOOLS) -> None:
    schemas = {t["name"]: t["input_schema"] for t in tools}
    assert block.type == "tool_use" and block.name in schemas and block.id
    jsonschema.validate(block.input, {**schemas[block.name], "additionalProperties": False})


# The SDK's `messages.create` no longer takes temperature / top_p / top_k (newer Claude models
# refuse them); the API still accepts them, so they go in `extra_body` here.


# -- text ----------------------------------------------------------------------------------------
def test_message_with_text(client, server):
    msg = client.messages.create(model="default", max_tokens=8, messages=USER, extra_body={"temperature": 0, "ignore_eos": True})
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.model == server.state.model_id
    (block,) = msg.content
    assert block.type == "text" and block.text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 8 and msg.usage.input_tokens > 0


def test_stream_sends_anthropic_events_in_order(client, server):
    kw = dict(model="default", max_tokens=8, messages=USER, extra_body={"temperature": 0, "ignore_eos": True})
    whole = client.messages.create(**kw)
    status, text = post(server.url + "/v1/messages", {"model": "default", "max_tokens": 8, "messages": USER,
                                                      "temperature": 0, "ignore_eos": True, "stream": True})
    assert status == 200
    events = sse_events(text)
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == kind for kind, data in events)
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == whole.usage.input_tokens and start["content"] == []
    streamed = "".join(d["delta"]["text"] for k, d in events if k == "content_block_delta")
    assert {d["delta"]["type"] for k, d in events if k == "content_block_delta"} == {"text_delta"}
    assert streamed == whole.content[0].text
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 8
    # The SDK's stream helper assembles the same message.
    with client.messages.stream(**kw) as stream:
        text_parts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(text_parts) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens"


def test_system_string_and_blocks_and_count_tokens(client):
    as_text = client.messages.create(model="default", max_tokens=2, messages=USER, system="Be brief.")
    as_blocks = client.messages.create(model="default", max_tokens=2, messages=USER,
                                       system=[{"type": "text", "text": "Be brief."}])
    bare = client.messages.create(model="default", max_tokens=2, messages=USER)
    assert as_text.usage.input_tokens == as_blocks.usage.input_tokens > bare.usage.input_tokens
    counted = client.messages.count_tokens(model="default", messages=USER, system="Be brief.")
    assert counted.input_tokens == as_text.usage.input_tokens
    with_tools = client.messages.count_tokens(model="default", messages=USER, system="Be brief.", tools=TOOLS)
    assert with_tools.input_tokens > counted.input_tokens


def test_stop_sequences(client):
    kw = dict(model="default", max_tokens=12, messages=USER, extra_body={"temperature": 0, "ignore_eos": True})
    text = client.messages.create(**kw).content[0].text
    stop = text[3:6] if len(text.strip()) >= 6 else text[-2:]
    assert stop
    msg = client.messages.create(stop_sequences=[stop], **kw)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == text[:text.index(stop)]
    with client.messages.stream(stop_sequences=[stop], **kw) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


# -- tools ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_any_forces_a_valid_call(client, seed):
    msg = client.messages.create(model="default", max_tokens=80, messages=[{"role": "user", "content": "Add 2 and 3"}],
                                 tools=TOOLS, tool_choice={"type": "any"}, extra_body={"seed": seed})
    assert msg.stop_reason == "tool_use"
    (block,) = [b for b in msg.content if b.type == "tool_use"]
    check_tool_use(block)


def test_named_tool_choice_streams_the_same_call(client, server):
    kw = dict(model="default", max_tokens=80, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
              tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"seed": 3})
    whole = client.messages.create(**kw)
    (expected,) = whole.content
    check_tool_use(expected)
    assert expected.name == "get_weather"
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    (got,) = final.content
    assert (got.name, got.input) == (expected.name, expected.input) and final.stop_reason == "tool_use"
    body = {k: v for k, v in kw.items() if k != "extra_body"} | {"seed": 3, "stream": True}
    events = sse_events(post(server.url + "/v1/messages", body)[1])
    starts = [d["content_block"] for k, d in events if k == "content_block_start"]
    assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["input"] == {}
    deltas = [d["delta"] for k, d in events if k == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"input_json_delta"}
    assert json.loads("".join(d["partial_json"] for d in deltas)) == expected.input


def test_tool_choice_none_and_tool_results(client):
    plain = client.messages.create(model="default", max_tokens=4, messages=USER, tools=TOOLS,
                                   tool_choice={"type": "none"}, extra_body={"temperature": 0})
    bare = client.messages.create(model="default", max_tokens=4, messages=USER, extra_body={"temperature": 0})
    assert [b.type for b in plain.content] == ["text"] and plain.usage.input_tokens == bare.usage.input_tokens
    history = [
        {"role": "user", "content": "Add 2 and 3"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me add."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "add",
                                           "input": {"a": 2, "b": 3}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"},
                                     {"type": "text", "text": "Thanks"}]},
    ]
    msg = client.messages.create(model="default", max_tokens=4, messages=history, tools=TOOLS)
    assert msg.usage.input_tokens == client.messages.count_tokens(model="default", messages=history,
                                                                  tools=TOOLS).input_tokens
    as_blocks = [*history[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "5"}]},
        {"type": "text", "text": "Thanks"}]}]
    assert client.messages.count_tokens(model="default", messages=as_blocks, tools=TOOLS).input_tokens == \
        msg.usage.input_tokens


def test_thinking_blocks(thinking_server):
    client = client_for(thinking_server)
    kw = dict(model="default", max_tokens=10, messages=USER, extra_body={"temperature": 0, "ignore_eos": True})
    msg = client.messages.create(**kw)
    assert msg.content[0].type == "thinking" and msg.content[0].thinking
    off = client.messages.create(thinking={"type": "disabled"}, **kw)
    assert [b.type for b in off.content] == ["text"]
    assert off.usage.input_tokens < msg.usage.input_tokens  # no "<think>" opened in the prompt
    with client.messages.stream(**kw) as stream:
        kinds = {e.delta.type for e in stream if e.type == "content_block_delta"}
        final = stream.get_final_message()
    assert "thinking_delta" in kinds and final.content[0].thinking == msg.content[0].thinking
    # A thinking block in the history is accepted (the template drops earlier reasoning).
    history = [*USER, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""},
                                                        {"type": "text", "text": "Hello"}]}, *USER]
    assert client.messages.count_tokens(model="default", messages=history).input_tokens > 0


# -- errors and keys -----------------------------------------------------------------------------
BAD = [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": 0, "messages": USER}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "system"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "image"),
    ({"max_tokens": 5, "messages": USER, "tool_choice": {"type": "any"}}, "tool"),
    ({"max_tokens": 5, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "x"}]}, "input_schema"),
    ({"max_tokens": 5, "messages": USER, "temperature": "hot"}, "temperature"),
    ({"max_tokens": 5, "messages": USER, "stop_sequences": "x"}, "stop_sequences"),
    ({"max_tokens": 5, "messages": USER, "thinking": {"type": "maybe"}}, "thinking"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[n for _, n in BAD])
def test_bad_requests_get_the_anthropic_error_envelope(server, body, needle):
    for stream in (False, True):
        status, text = post(server.url + "/v1/messages", {**body, "stream": stream})
        err = json.loads(text)
        assert status == 400 and err["type"] == "error", text
        assert err["error"]["type"] == "invalid_request_error" and needle in err["error"]["message"], text
    # ... and the server goes on serving.
    assert post(server.url + "/v1/messages", {"max_tokens": 2, "messages": USER})[0] == 200


def test_sdk_errors(client):
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=2, messages=USER)
    assert err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="default", max_tokens=2, messages=[{"role": "user", "content": "x " * 20000}])
    assert "context" in err.value.body["error"]["message"]
    status, text = post(client.base_url.__str__().rstrip("/") + "/v1/nothing", {})
    assert status == 404 and json.loads(text)["error"]["code"] == "route_not_found"  # OpenAI's shape elsewhere


def test_api_key_guards_the_messages_routes(keyed_server):
    url = keyed_server.url + "/v1/messages"
    body = {"model": "default", "max_tokens": 2, "messages": USER}
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        status, text = post(url, body, headers)
        assert status == 401 and json.loads(text) == {"type": "error", "error": {
            "type": "authentication_error", "message": json.loads(text)["error"]["message"]}}
        assert "x-api-key" in json.loads(text)["error"]["message"]
    for headers in ({"x-api-key": "sekrit"}, {"Authorization": "Bearer sekrit"}):
        assert post(url, body, headers)[0] == 200
        assert post(url + "/count_tokens", body, headers)[0] == 200
    with pytest.raises(anthropic.AuthenticationError):
        client_for(keyed_server, api_key="wrong").messages.create(**body)
    assert client_for(keyed_server, api_key="sekrit").messages.create(**body).content
    bearer = anthropic.Anthropic(base_url=keyed_server.url, auth_token="sekrit", api_key=None, max_retries=0)
    assert bearer.messages.count_tokens(model="default", messages=USER).input_tokens > 0
    # The OpenAI routes keep OpenAI's error shape.
    status, text = post(keyed_server.url + "/v1/chat/completions", {"messages": "hi"}, {"x-api-key": "wrong"})
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
