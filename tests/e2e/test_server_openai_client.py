"""The official `openai` client (sync and async) against the real server on a tiny model:
chat, completions, responses, streaming, n, stop, logprobs, usage, errors and 32
concurrent streams (llama.cpp / vLLM server-test style)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

openai = pytest.importorskip("openai")

MAX = 12  # tokens per answer: enough to compare, cheap on 2 cores


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(server):
    return server.state.model_id


def prompt_tokens(server, messages) -> int:
    req = urllib.request.Request(server.url + "/tokenize", data=json.dumps({"messages": messages}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["count"]


def greedy(client, model, content: str, **kw):
    kw.setdefault("max_tokens", MAX)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


# -- models and chat ------------------------------------------------------------------------------
def test_models_list(client, model):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["default", model]
    assert client.models.retrieve(model).id == model


def test_chat_completion_exact_usage(server, client, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    res = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert res.id.startswith("chatcmpl-") and res.object == "chat.completion" and res.model == model
    (choice,) = res.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert res.usage.completion_tokens == MAX
    assert res.usage.prompt_tokens == prompt_tokens(server, messages)
    assert res.usage.total_tokens == res.usage.prompt_tokens + MAX
    # "default" names the served model; content given as parts means the same as a string.
    parts = client.chat.completions.create(
        model="default", max_tokens=MAX, temperature=0, extra_body={"ignore_eos": True},
        messages=[messages[0], {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    assert parts.choices[0].message.content == choice.message.content


def test_stream_equals_non_stream_and_chunk_contract(client, model):
    ref = greedy(client, model, "Tell me about the sea").choices[0]
    chunks = list(greedy(client, model, "Tell me about the sea", stream=True))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.message.content
    assert all(c.usage is None for c in chunks)


def test_include_usage(client, model):
    chunks = list(greedy(client, model, "Count", stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in body)
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == greedy(client, model, "Count").choices[0].message.content


def test_n_choices(client, model):
    res = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Pick"}], n=2,
                                         max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in res.choices] == [0, 1]
    assert res.choices[0].message.content != res.choices[1].message.content
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Pick"}], n=2,
                                                 max_tokens=8, temperature=1.0, seed=11, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert sum(1 for m in mine if m.finish_reason) == 1
        assert "".join(m.delta.content or "" for m in mine) == res.choices[i].message.content


def test_stop_string(client, model):
    full = greedy(client, model, "Say something long", max_tokens=24, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    start = next((i for i in range(3, len(text)) if text[i].isalnum()), 3)
    stop = text[start:start + 2] if text[start:start + 2].isalnum() else text[start]
    cut = text[:text.find(stop)]
    res = greedy(client, model, "Say something long", max_tokens=24, stop=[stop], extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "stop" and res.choices[0].message.content == cut
    streamed = list(greedy(client, model, "Say something long", max_tokens=24, stop=stop, stream=True,
                           extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut


def test_logprobs_concatenate_to_content(client, model):
    res = greedy(client, model, "Logprobs please", logprobs=True, top_logprobs=3)
    choice = res.choices[0]
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    assert len(entries) == res.usage.completion_tokens - (choice.finish_reason == "stop")
    for e in entries:
        assert e.logprob <= 0 and e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
    # At temperature 0 the chosen token is the most likely one.
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4) for e in entries)
    streamed = list(greedy(client, model, "Logprobs please", logprobs=True, top_logprobs=3, stream=True))
    tokens = [t.token for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(tokens) == choice.message.content == "".join(c.choices[0].delta.content or "" for c in streamed)
    assert greedy(client, model, "x", logprobs=False).choices[0].logprobs is None


# -- completions ----------------------------------------------------------------------------------
def test_completions(client, model):
    res = client.completions.create(model=model, prompt="Once upon a time", max_tokens=MAX, temperature=0,
                                    echo=True, logprobs=2)
    assert res.id.startswith("cmpl-") and res.object == "text_completion"
    (choice,) = res.choices
    assert choice.text.startswith("Once upon a time")
    generated = choice.text[len("Once upon a time"):]
    assert "".join(choice.logprobs.tokens) == generated
    assert choice.logprobs.text_offset[0] == len("Once upon a time")
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=MAX, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == generated
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens


# -- responses --------------------------------------------------------------------------------------
def test_responses_chain_retrieve_delete(client, model):
    first = client.responses.create(model=model, input="My name is Ada.", instructions="Be brief.",
                                    max_output_tokens=8, temperature=0)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    assert first.output[0].type == "message" and first.output_text == first.output[0].content[0].text
    assert first.usage.output_tokens >= 1
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    # The chained prompt holds the first turn (but not its instructions).
    alone = client.responses.create(model=model, input="What is my name?", max_output_tokens=8, temperature=0,
                                    store=False)
    with_history = client.responses.create(model=model, max_output_tokens=8, temperature=0, store=False, input=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == with_history.usage.input_tokens > alone.usage.input_tokens
    assert second.output_text == with_history.output_text
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=model, input="again", previous_response_id=first.id)


def test_responses_stream(client, model):
    events = list(client.responses.create(model=model, input="Stream it", max_output_tokens=6, temperature=0,
                                          stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text
    assert client.responses.retrieve(final.id).output_text == deltas


def test_a_response_cut_by_max_output_tokens_marks_its_message_incomplete(client, model):
    cut = client.responses.create(model=model, input="Go on", max_output_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[-1].status == "incomplete"
    events = list(client.responses.create(model=model, input="Go on", max_output_tokens=4, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True}))
    done = [e for e in events if e.type == "response.output_item.done"]
    assert events[-1].type == "response.incomplete" and done[-1].item.status == "incomplete"
    whole = client.responses.create(model=model, input="Go on", max_output_tokens=64, temperature=0,
                                    extra_body={"ignore_eos": False, "stop": ["a", "e", "o", " "]})
    if whole.status == "completed":
        assert all(item.status == "completed" for item in whole.output)


# -- errors ---------------------------------------------------------------------------------------
def test_errors(client, model):
    with pytest.raises(openai.BadRequestError) as bad:
        greedy(client, model, "hi", temperature=5)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ctx:
        greedy(client, model, "word " * 600)
    err = ctx.value.body
    assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 512 and err["n_prompt_tokens"] > 512
    with pytest.raises(openai.BadRequestError):  # a 400 before any SSE when streaming too
        greedy(client, model, "word " * 600, stream=True)
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as rf:
        greedy(client, model, "hi", response_format={"type": "hiccup"})
    assert rf.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as so:
        greedy(client, model, "hi", stream_options={"include_usage": True})
    assert so.value.body["param"] == "stream_options"
    # After all that, the server still answers.
    assert greedy(client, model, "still there?").choices[0].message.content is not None


def test_api_key(keyed_server, model):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sekrit", max_retries=0)
    assert good.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2).choices
    with urllib.request.urlopen(keyed_server.url + "/health", timeout=10) as r:
        assert r.status == 200


# -- async client and concurrency ---------------------------------------------------------------------
def test_async_client_32_concurrent_streams_match_sequential(server, model):
    prompts = [f"Request number {i} about {topic}" for i, topic in enumerate(
        ["cats", "rivers", "code", "tea", "stars", "bread", "maps", "rain"])]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        kw = dict(model=model, temperature=0, max_tokens=MAX)
        alone = {}
        for p in prompts:
            res = await client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
            alone[p] = (res.choices[0].message.content, res.choices[0].finish_reason)

        async def stream(p):
            text, finish, usage = [], [], None
            s = await client.chat.completions.create(messages=[{"role": "user", "content": p}], stream=True,
                                                     stream_options={"include_usage": True}, **kw)
            async for chunk in s:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    text.append(c.delta.content or "")
                    if c.finish_reason:
                        finish.append(c.finish_reason)
            return p, "".join(text), finish, usage

        results = await asyncio.gather(*(stream(prompts[i % len(prompts)]) for i in range(32)))
        await client.close()
        return alone, results

    alone, results = asyncio.run(main())
    assert len(results) == 32
    for p, text, finish, usage in results:
        assert (text, finish) == (alone[p][0], [alone[p][1]]), p
        assert usage is not None and usage.completion_tokens >= 1
