"""Structured output, tool calling, the server-side tool loop and reasoning, end to end on a
tiny random-weight model: its tokens are arbitrary, so only the constraint can make the output
valid. Every check runs over 20 seeds (one request with `n=20` and a seed gives 20 distinct,
reproducible choices), through the HTTP server and the official `openai` client, or through
the Python API (`Runner`)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SEEDS = 20

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
USER = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "editor", "viewer"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}


def strict(tool: dict) -> dict:
    return {"type": "function", "function": {**tool["function"], "strict": True}}


def check_call(name: str, arguments: str, tools=TOOLS) -> dict:
    """A call to a declared tool whose arguments (a JSON string) follow its schema, with no
    undeclared keys."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert name in schemas
    assert isinstance(arguments, str)
    args = json.loads(arguments)
    jsonschema.validate(args, {**schemas[name], "additionalProperties": False})
    return args


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, content="Hi", **kw):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}], **kw)


# -- structured output -----------------------------------------------------------------------------
def test_json_schema_output_validates(client):
    res = ask(client, "A user record, please.", n=SEEDS, seed=0, max_tokens=250,
              response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": USER,
                                                                      "strict": True}})
    assert len(res.choices) == SEEDS
    for choice in res.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), USER)
    assert len({c.message.content for c in res.choices}) > 1


def test_json_object_output_is_an_object(client):
    # Any object: random keys and values of any length, so some choices hit max_tokens.
    res = ask(client, "JSON please", n=SEEDS, seed=1, max_tokens=250, response_format={"type": "json_object"})
    stopped = [c for c in res.choices if c.finish_reason == "stop"]
    assert len(stopped) >= SEEDS // 4
    for choice in stopped:
        assert isinstance(json.loads(choice.message.content), dict)


def test_regex_grammar_on_chat_and_completions(client):
    pattern = r"[a-c]{3}-[0-9]{2,4}( ok)?"
    grammar = {"type": "regex", "value": pattern}
    res = ask(client, n=SEEDS, seed=2, max_tokens=30, extra_body={"grammar": grammar})
    for choice in res.choices:
        assert re.fullmatch(pattern, choice.message.content), choice.message.content
    done = client.completions.create(model="default", prompt="Code:", n=SEEDS, seed=3, max_tokens=30,
                                     extra_body={"grammar": grammar})
    for choice in done.choices:
        assert re.fullmatch(pattern, choice.text), choice.text


def test_lark_grammar_output_parses(client):
    lark = 'start: expr\nexpr: NUMBER (OP NUMBER)*\nOP: " + " | " - " | " * "\nNUMBER: /[1-9][0-9]{0,2}/'
    res = ask(client, "2+2?", n=SEEDS, seed=4, max_tokens=40, extra_body={"grammar": {"type": "lark", "value": lark}})
    for choice in res.choices:
        text = choice.message.content
        if choice.finish_reason == "stop":
            assert re.fullmatch(r"[1-9][0-9]{0,2}( [-+*] [1-9][0-9]{0,2})*", text), text
            eval(text, {"__builtins__": {}})  # an arithmetic expression  # noqa: S307
        else:  # cut by max_tokens: still a prefix of the language
            assert re.fullmatch(r"[0-9]+(( [-+*]? ?)[0-9]*)*", text), text


def test_invalid_schemas_and_grammars_are_400s_naming_the_problem(client):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "sound"}}}},
         "response_format", "sound"),
        ({"extra_body": {"grammar": {"type": "regex", "value": "[a-"}}}, "grammar", "regex"),
        ({"extra_body": {"grammar": {"type": "lark", "value": "start: foo"}}}, "grammar", "foo"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
          "tool_choice": "required"}, "tools", "'f'"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ]
    for kw, param, needle in cases:
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, max_tokens=4, **kw)
        body = err.value.body
        assert body["param"] == param and needle in body["message"], body


# -- tool calling ------------------------------------------------------------------------------------
def test_tool_choice_required_yields_a_valid_call_for_every_seed(client):
    res = ask(client, "What's the weather in Paris?", tools=TOOLS, tool_choice="required", n=SEEDS, seed=5,
              max_tokens=80)
    names = set()
    for choice in res.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call-")
        check_call(call.function.name, call.function.arguments)
        names.add(call.function.name)
        assert not choice.message.content
    assert names == {"get_weather", "add"}  # the model chose, the grammar kept it valid


def test_named_tool_choice_calls_that_tool(client):
    for choice_form in ({"type": "function", "function": {"name": "add"}}, {"type": "function", "name": "add"},
                        {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "add"}]}):
        res = ask(client, tools=TOOLS, tool_choice=choice_form, n=SEEDS // 2, seed=6, max_tokens=60)
        for choice in res.choices:
            (call,) = choice.message.tool_calls
            assert call.function.name == "add"
            check_call("add", call.function.arguments)


def test_tool_choice_none_gives_plain_content_and_offers_no_tools(client):
    plain = ask(client, "Hi there", tools=TOOLS, tool_choice="none", max_tokens=8, seed=7, temperature=0)
    without = ask(client, "Hi there", max_tokens=8, seed=7, temperature=0)
    offered = ask(client, "Hi there", tools=TOOLS, tool_choice="auto", max_tokens=8, seed=7, temperature=0)
    assert plain.choices[0].message.tool_calls is None and isinstance(plain.choices[0].message.content, str)
    assert plain.choices[0].message.content == without.choices[0].message.content
    assert plain.usage.prompt_tokens == without.usage.prompt_tokens < offered.usage.prompt_tokens


def test_streamed_tool_calls_merge_into_the_same_call(client):
    tools = [strict(t) for t in TOOLS]
    kw = dict(model="default", messages=[{"role": "user", "content": "Weather?"}], tools=tools,
              tool_choice="required", seed=12, max_tokens=80, n=SEEDS)
    whole = client.chat.completions.create(**kw)
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert len(final.choices) == SEEDS
    for expected_choice, merged_choice in zip(whole.choices, sorted(final.choices, key=lambda c: c.index)):
        (expected,) = expected_choice.message.tool_calls
        (merged,) = merged_choice.message.tool_calls
        assert merged_choice.finish_reason == "tool_calls"
        assert (merged.function.name, merged.function.arguments) == (expected.function.name,
                                                                     expected.function.arguments)
        assert merged.function.parsed_arguments == check_call(merged.function.name, merged.function.arguments)
    # The raw chunks: one tool-call delta per choice with index, id, type, name and the arguments.
    chunks = list(client.chat.completions.create(stream=True, **{**kw, "n": 1}))
    deltas = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    expected = whole.choices[0].message.tool_calls[0]
    assert [(d.index, d.type, d.function.name) for d in deltas] == [(0, "function", expected.function.name)]
    assert deltas[0].id.startswith("call-") and deltas[0].function.arguments == expected.function.arguments
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]


def test_async_client_streams_a_required_call(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with client.chat.completions.stream(
                model="default", messages=[{"role": "user", "content": "Add 2 and 3"}],
                tools=[strict(ADD)], tool_choice="required", seed=11, max_tokens=60) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
        await client.close()
        return final

    final = asyncio.run(main())
    (call,) = final.choices[0].message.tool_calls
    check_call("add", call.function.arguments)


def test_tool_history_round_trip(client):
    """An assistant turn with tool_calls (arguments a JSON string) and a tool result are accepted
    and rendered through the template."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ]
    res = client.chat.completions.create(model="default", messages=messages, tools=TOOLS, max_tokens=4, seed=1)
    assert res.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_responses_api_function_calls_and_text_format(client):
    flat = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
            for t in TOOLS]
    resp = client.responses.create(model="default", input="Weather in Paris?", tools=flat, tool_choice="required",
                                   max_output_tokens=80, extra_body={"seed": 3})
    (item,) = [o for o in resp.output if o.type == "function_call"]
    check_call(item.name, item.arguments)
    assert item.call_id.startswith("call-") and resp.status == "completed"
    events = list(client.responses.create(model="default", input="Weather in Paris?", tools=flat,
                                          tool_choice="required", max_output_tokens=80, stream=True,
                                          extra_body={"seed": 3}))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == item.arguments
    # text.format (the Responses form of response_format)
    resp = client.responses.create(model="default", input="A user", max_output_tokens=250,
                                   text={"format": {"type": "json_schema", "name": "user", "schema": USER,
                                                    "strict": True}}, extra_body={"seed": 4})
    jsonschema.validate(json.loads(resp.output_text), USER)


# -- server-side tools through the Python API ----------------------------------------------------------
try:
    importlib.metadata.distribution("mistralrs-calculator")
    CALCULATOR = True
except importlib.metadata.PackageNotFoundError:
    CALCULATOR = False


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from mistralrs.api import Runner, Which
    from tests.helpers.tiny_models import write_tiny_llama

    # A longer context than the shared model's 512: tool schemas and a round of results fill it.
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("runner-model") / "tiny-llama", max_position_embeddings=2048)

    calls: list[tuple[str, dict]] = []

    def weather(name: str, args: dict) -> str:
        calls.append((name, args))
        return f"sunny in {args['city']}"

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_blk_size=16, pa_ctxt_len=8192,
               tool_callbacks={"get_weather": weather}, enable_tool_sources=["calculator"] if CALCULATOR else False)
    r.weather_calls = calls
    yield r
    r.shutdown()


def test_runner_tool_loop_with_a_python_callback(runner):
    from mistralrs.api import ChatCompletionRequest

    for stream in (False, True):
        before = len(runner.weather_calls)
        req = ChatCompletionRequest(messages="Weather in Paris?", tools=[WEATHER], max_tokens=60, seed=1, stream=stream,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
        res = runner.send_chat_completion_request(req)
        if stream:
            chunks = list(res)
            finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
            records = finish.agentic_tool_calls
            assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)  # ran server-side
            usage = chunks[-1].usage
        else:
            records = res.agentic_tool_calls
            assert res.choices[0].message.tool_calls is None  # the model did not call it again (auto)
            usage = res.usage
        (record,) = records
        assert record.round == 0 and record.name == "get_weather"
        args = check_call("get_weather", record.arguments)
        assert runner.weather_calls[before:] == [("get_weather", args)]
        assert record.result_content == f"sunny in {args['city']}"
        assert usage.prompt_tokens > 300  # two rounds: the second prompt holds the call and its result


def test_runner_grammar_fields(runner):
    from mistralrs.api import ChatCompletionRequest, CompletionRequest

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="A date?", grammar=r"[0-9]{4}-[0-9]{2}-[0-9]{2}", grammar_type="regex", n_choices=SEEDS, seed=1,
        max_tokens=20))
    assert all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", c.message.content) for c in res.choices)
    done = runner.send_completion_request(CompletionRequest(
        prompt="User:", grammar=json.dumps(USER), grammar_type="json_schema", n_choices=SEEDS, seed=2, max_tokens=250))
    for choice in done.choices:
        jsonschema.validate(json.loads(choice.text), USER)


def test_runner_max_tool_rounds_zero_returns_the_call(runner):
    from mistralrs.api import ChatCompletionRequest

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="Weather?", tools=[WEATHER], tool_choice="required", max_tokens=60, seed=2, max_tool_rounds=0))
    (call,) = res.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and res.agentic_tool_calls is None


@pytest.mark.skipif(not CALCULATOR, reason="pip install -e contrib/mistralrs-calculator to run")
def test_runner_tool_loop_with_the_calculator_tool_source(runner):
    from mistralrs_calculator import CalculatorTools

    from mistralrs.api import ChatCompletionRequest

    quote = runner.tokenize_text('"', add_special_tokens=False)
    assert len(quote) == 1
    # A random model writes endless strings; make it close the expression string soon.
    req = ChatCompletionRequest(messages="What is 6 * 7?", tool_choice="required", max_tokens=40, seed=5,
                                logit_bias={quote[0]: 8.0})
    res = runner.send_chat_completion_request(req)
    (record,) = res.agentic_tool_calls[:1]
    assert record.name == "calculate"
    args = json.loads(record.arguments)
    assert set(args) == {"expression"}
    assert record.result_content == CalculatorTools().call("calculate", args)


# -- reasoning ---------------------------------------------------------------------------------------
def test_reasoning_split_when_the_template_opens_think(thinking_server):
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    # The prompt ends in "<think>\n": the model reasons until </think>, then answers.
    lark = 'start: /[a-z]{3,8}/ </think> "\\n\\n" /[a-z]{2,6}/'
    kw = dict(model="default", messages=[{"role": "user", "content": "Think first."}], seed=8, max_tokens=40,
              extra_body={"grammar": {"type": "lark", "value": lark}})
    res = client.chat.completions.create(n=SEEDS, **kw)
    for choice in res.choices:
        assert re.fullmatch("[a-z]{3,8}", choice.message.reasoning_content), choice.message
        assert re.fullmatch("[a-z]{2,6}", choice.message.content), choice.message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (res.choices[0].message.reasoning_content, res.choices[0].message.content)


def test_reasoning_split_with_explicit_tags(thinking_server):
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    lark = 'start: <think> /[a-z]{3,8}/ </think> /[a-z]{2,6}/'
    res = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], n=SEEDS, seed=9, max_tokens=40,
        extra_body={"grammar": {"type": "lark", "value": lark}, "chat_template_kwargs": {"enable_thinking": False}})
    for choice in res.choices:
        assert re.fullmatch("[a-z]{3,8}", choice.message.reasoning_content), choice.message
        assert re.fullmatch("[a-z]{2,6}", choice.message.content), choice.message
    # Without reasoning the field is null and the content is untouched.
    plain = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], seed=9, max_tokens=10,
        extra_body={"grammar": {"type": "regex", "value": "[a-z]{2,6}"}, "enable_thinking": False})
    assert plain.choices[0].message.reasoning_content is None
    assert re.fullmatch("[a-z]{2,6}", plain.choices[0].message.content)


def test_runner_refuses_a_model_it_does_not_serve(runner):
    from mistralrs.api import ChatCompletionRequest
    from mistralrs.errors import NotFoundError

    req = ChatCompletionRequest(messages="hi", max_tokens=2)
    with pytest.raises(NotFoundError, match="this Runner serves"):
        runner.send_chat_completion_request(req, model_id="some/other-model")
    with pytest.raises(NotFoundError):
        runner.max_sequence_length(model_id="some/other-model")
    assert runner.send_chat_completion_request(req, model_id=runner.get_default_model_id()).choices
    assert runner.send_chat_completion_request(req, model_id="default").choices
