"""Tool calling, structured output and reasoning wired into the request path, without a model:
request validation (`tools`, `tool_choice`, `response_format`, `grammar`), the grammars that force
a call in each parser family's wire format (random walks over what llguidance allows), the
server's parsing of scripted engine output (vLLM's engine-mock pattern) for chat, streaming,
the Responses API and the server-side tool loop, the Python API's request fields, the CLI
flags and interactive mode's dimmed reasoning."""

from __future__ import annotations

import argparse
import io
import json
import random
import types
from typing import Any

import pytest

from mistralrs.engine.constraints import ConstraintFactory, GrammarSpec
from mistralrs.engine.engine import ChoiceFinished, RequestDone, TokenDelta
from mistralrs.errors import InvalidRequest
from mistralrs.parsing import make_tool_parser
from mistralrs.plugins import get_registry
from mistralrs.tokenization import Tokenizer
from mistralrs.tool_calling import (
    OutputPipeline,
    ToolConfig,
    normalize_tools,
    prepare_chat,
    resolve_tool_choice,
    tool_call_grammar,
)
from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, write_tiny_tokenizer
from tests.unit.test_server_frontend import FakeService, chat, client_for, data_events, run, script_for, usage

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
# A template that marks the model as a Hermes-style tool caller and a <think> reasoner.
TEMPLATE_TEXT = "{{ messages }} <tool_call> </think>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


class ToolService(FakeService):
    """The fake service with a chat template that selects the hermes and think parsers; the
    prompt ends inside <think> when enable_thinking is true (a Qwen3-Thinking-like template)."""

    def __init__(self, tokenizer: Tokenizer, script: Any = None) -> None:
        super().__init__(tokenizer, script)
        self.chat_template = types.SimpleNamespace(templates={"default": TEMPLATE_TEXT}, available=True)
        self.rendered_tools: list[Any] = []

    def render_chat(self, messages, *, tools=None, add_generation_prompt=True, enable_thinking=None, **kw) -> str:
        self.rendered_tools.append(tools)
        text = super().render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kw)
        return text + ("<think>\n" if enable_thinking else "")


def tokens(*parts: str) -> list[list[str]]:
    return [list(parts)]


def call_text(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


# -- request validation ------------------------------------------------------------------------------
def test_tools_are_normalised_and_validated():
    flat = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}
    assert normalize_tools([flat, WEATHER]) == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}, WEATHER]
    for bad, needle in (({"type": "web_search"}, "only function tools"), ({"function": {"name": ""}}, "name"),
                        ({"function": {"name": "f", "parameters": 3}}, "parameters"), ("f", "object")):
        with pytest.raises(InvalidRequest, match=needle) as err:
            normalize_tools([bad])
        assert err.value.param == "tools"
    with pytest.raises(InvalidRequest, match="twice"):
        normalize_tools([WEATHER, WEATHER])


def test_tool_choice_forms():
    names = ["get_weather", "add"]
    assert resolve_tool_choice(None, names).mode == "auto"
    assert resolve_tool_choice(None, []).mode == "none"
    assert resolve_tool_choice("auto", []).mode == "none"
    assert resolve_tool_choice("none", names).mode == "none"
    assert resolve_tool_choice("required", names) == resolve_tool_choice("required", names)
    assert resolve_tool_choice({"type": "function", "function": {"name": "add"}}, names).names == ("add",)
    assert resolve_tool_choice({"type": "function", "name": "add"}, names).names == ("add",)
    allowed = resolve_tool_choice({"type": "allowed_tools", "mode": "required",
                                   "tools": [{"type": "function", "name": "add"}]}, names)
    assert (allowed.mode, allowed.names) == ("required", ("add",))
    nested = resolve_tool_choice({"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}, names)
    assert (nested.mode, nested.names) == ("auto", ("get_weather",))
    for bad in ("required", "sometimes", {"type": "function", "name": "nope"}, {"type": "file_search"},
                {"type": "allowed_tools", "mode": "maybe", "tools": []}, 7):
        with pytest.raises(InvalidRequest) as err:
            resolve_tool_choice(bad, names if bad != "required" else [])
        assert err.value.param == "tool_choice"


def test_tool_history_is_rendered_with_arguments_as_objects():
    from mistralrs.chat_template import ChatTemplate
    from mistralrs.protocol import normalize_messages

    messages = normalize_messages([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"function": {"name": "add", "parameters": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
    ])
    calls = messages[1]["tool_calls"]
    assert calls[0] == {"id": "call-1", "type": "function", "function": {"name": "get_weather",
                                                                       "arguments": {"city": "Paris"}}}
    assert calls[1]["function"]["arguments"] == {"a": 1}
    text = ChatTemplate(CHATML_TEMPLATE).render(messages, tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the tools were rendered
    assert "<tool_response>\nsunny\n</tool_response>" in text
    with pytest.raises(InvalidRequest, match="tool_calls"):
        normalize_messages([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}])


# -- grammars that force a call ------------------------------------------------------------------------
def random_walk(factory: ConstraintFactory, grammar: str, seed: int, limit: int = 400) -> list[int]:
    state = factory.new_state(GrammarSpec("lark", grammar, "tools"))
    rnd = random.Random(seed)
    out: list[int] = []
    eos = set(factory.eos_token_ids)
    for _ in range(limit):
        allowed = state.allowed_tokens().tolist()
        token = rnd.choice(allowed)
        if token in eos:
            break
        state.advance(token)
        out.append(token)
        if state.is_finished():
            break
    return out


@pytest.mark.parametrize("family", ["hermes", "mistral", "llama3", "deepseek", "json"])
def test_forced_call_grammar_yields_a_valid_call_in_each_family(tokenizer, family):
    registry = get_registry()
    parser = make_tool_parser(registry.tool_parsers.get(family))
    factory = ConstraintFactory(tokenizer, tokenizer.vocab_size)
    grammar = tool_call_grammar(parser, TOOLS, tokenizer, forced=True)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names = set()
    for seed in range(8):
        text = tokenizer.decode(random_walk(factory, grammar, seed), skip_special_tokens=False)
        parsed = make_tool_parser(registry.tool_parsers.get(family)).parse(text)
        (call,) = parsed.tool_calls
        jsonschema.validate(json.loads(call.arguments), {**schemas[call.name], "additionalProperties": False})
        assert parsed.content == ""
        names.add(call.name)
    assert names == {"get_weather", "add"}


def test_forced_call_grammar_after_an_open_reasoning_block(tokenizer):
    parser = make_tool_parser(get_registry().tool_parsers.get("hermes"))
    factory = ConstraintFactory(tokenizer, tokenizer.vocab_size)
    grammar = tool_call_grammar(parser, [ADD], tokenizer, forced=True, reasoning_close="</think>")
    rnd = random.Random(0)
    state = factory.new_state(GrammarSpec("lark", grammar, "tools"))
    close = tokenizer.added_tokens["</think>"]
    out = tokenizer.encode("I should add.", add_special_tokens=False)
    for tok in out:  # free reasoning until the close tag
        state.advance(tok)
    assert close in state.allowed_tokens().tolist() and len(state.allowed_tokens()) > 100
    state.advance(close)
    out.append(close)
    while not state.is_finished():
        out.append(rnd.choice(state.allowed_tokens().tolist()))
        state.advance(out[-1])
    text = tokenizer.decode(out, skip_special_tokens=False)
    pipe = OutputPipeline(reasoning=_think(starts=True), tools=parser, client_names=["add"])
    parsed = pipe.parse(text)
    assert parsed.reasoning and [c.name for c in parsed.calls] == ["add"]


def _think(starts: bool = False) -> Any:
    from mistralrs.parsing import make_reasoning_parser

    return make_reasoning_parser(get_registry().reasoning_parsers.get("think"), starts_in_reasoning=starts)


def test_auto_grammar_checks_strict_calls_only_once_started(tokenizer):
    parser = make_tool_parser(get_registry().tool_parsers.get("hermes"))
    factory = ConstraintFactory(tokenizer, tokenizer.vocab_size)
    strict_add = {"type": "function", "function": {**ADD["function"], "strict": True}}
    grammar = tool_call_grammar(parser, [WEATHER, strict_add], tokenizer, forced=False, strict_only=True)
    state = factory.new_state(GrammarSpec("lark", grammar, "tools"))
    assert len(state.allowed_tokens()) > 100  # free text first
    opened = tokenizer.added_tokens["<tool_call>"]
    for tok in tokenizer.encode("Sure. ", add_special_tokens=False) + [opened]:
        state.advance(tok)
    prefix = '\n{"name": "add", "arguments": {"a": '
    for tok in tokenizer.encode(prefix, add_special_tokens=False):
        state.advance(tok)
    allowed = {tokenizer.decode([t]) for t in state.allowed_tokens().tolist()}
    assert allowed and all(a[:1].isdigit() for a in allowed)  # the strict schema: a digit 0-9


# -- the plan -------------------------------------------------------------------------------------------
def test_plan_builds_the_constraint_and_detokenization(tokenizer):
    svc = ToolService(tokenizer)
    plan = prepare_chat(svc, {"messages": "hi", "tools": TOOLS, "tool_choice": "required"})
    assert plan.tool_spec.name == "hermes" and plan.reasoning_spec.name == "think"
    req = plan.request
    assert req.grammar.kind == "lark" and req.grammar.param == "tools" and "call_1" in req.grammar.value
    assert req.skip_special_tokens is False  # <tool_call> is a special token of this tokenizer
    assert svc.rendered_tools[-1] == TOOLS
    plan = prepare_chat(svc, {"messages": "hi", "tools": TOOLS, "tool_choice": "none"})
    assert plan.request.grammar is None and svc.rendered_tools[-1] is None and not plan.parsing_tools
    plan = prepare_chat(svc, {"messages": "hi", "response_format": {"type": "json_object"}})
    assert plan.request.grammar.kind == "json_object"
    plan = prepare_chat(svc, {"messages": "hi", "tools": TOOLS})
    assert plan.request.grammar is None  # auto without strict functions: parsed, not constrained
    with pytest.raises(InvalidRequest) as err:
        prepare_chat(svc, {"messages": "hi", "tools": TOOLS, "tool_choice": "required",
                           "response_format": {"type": "json_object"}})
    assert err.value.param == "tool_choice"
    plan = prepare_chat(svc, {"messages": "hi", "tools": TOOLS, "tool_choice": "required", "enable_thinking": True})
    assert plan.starts_in_reasoning and "REASONING" in plan.request.grammar.value
    plan = prepare_chat(svc, {"messages": "hi", "chat_template_kwargs": {"enable_thinking": True}})
    assert plan.starts_in_reasoning
    plan = prepare_chat(svc, {"messages": "hi"}, ToolConfig(reasoning_parser="none", tool_parser="mistral"))
    assert plan.reasoning_spec is None and plan.tool_spec.name == "mistral" and not plan.active


def test_pipeline_drops_undeclared_calls_and_holds_server_calls():
    parser = make_tool_parser(get_registry().tool_parsers.get("hermes"))
    text = "Hi. " + call_text("nope", {}) + call_text("add", {"a": 1, "b": 2})
    parsed = OutputPipeline(tools=parser, client_names=["add"]).parse(text)
    assert parsed.content == "Hi." and [(c.name, c.arguments) for c in parsed.calls] == [("add", '{"a": 1, "b": 2}')]
    parser = make_tool_parser(get_registry().tool_parsers.get("hermes"))
    parsed = OutputPipeline(tools=parser, client_names=["add"], server_names=["calc"]).parse(
        call_text("calc", {"x": "1"}) + call_text("add", {"a": 1}))
    assert parsed.server_call.name == "calc" and parsed.calls == ()


# -- the server, with scripted engine output -------------------------------------------------------------
def test_chat_parses_tool_calls_streamed_and_not(tokenizer):
    output = ["Let me ", "check.", "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": "Paris", ',
              '"unit": "c"}}\n', "</tool_call>", call_text("undeclared", {})]

    async def body():
        svc = ToolService(tokenizer, lambda req: script_for(tokens(*output)))
        async with client_for(svc) as c:
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS))
            res = await r.json()
            (choice,) = res["choices"]
            assert choice["finish_reason"] == "tool_calls"
            msg = choice["message"]
            assert msg["content"] == "Let me check." and msg["reasoning_content"] is None
            (call,) = msg["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("call-") and call["index"] == 0
            assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS, stream=True))
            chunks = [e for e in data_events(await r.text()) if e != "[DONE]"]
            deltas = [ch["choices"][0]["delta"] for ch in chunks]
            assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
            calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
            assert [(tc["index"], tc["type"], tc["function"]) for tc in calls] == [
                (0, "function", {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'})]
            assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"][0]["finish_reason"]] == [
                "tool_calls"]
            assert deltas[0]["role"] == "assistant"
            # tool_choice none: the text is content, verbatim, and tools were not rendered.
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="none"))
            msg = (await r.json())["choices"][0]["message"]
            assert msg["content"] == "".join(output) and msg["tool_calls"] is None
            assert svc.rendered_tools[-1] is None
            assert svc.engine.requests[-1].grammar is None

    run(body())


def test_reasoning_split_with_prefilled_and_explicit_think(tokenizer):
    async def body():
        script = {True: ["Hmm, ", "let me ", "see.", "</think>", "\n\n", "It is ", "42."],
                  False: ["<think>", "Hmm.", "</think>", "\n\nIt is ", "42."]}
        svc = ToolService(tokenizer, lambda req: script_for(tokens(*script[svc.prefill])))
        async with client_for(svc) as c:
            for prefill in (True, False):
                svc.prefill = prefill
                r = await c.post("/v1/chat/completions", json=chat(enable_thinking=prefill))
                msg = (await r.json())["choices"][0]["message"]
                assert msg["content"] == "It is 42."
                assert msg["reasoning_content"] == ("Hmm, let me see." if prefill else "Hmm.")
                r = await c.post("/v1/chat/completions", json=chat(enable_thinking=prefill, stream=True))
                deltas = [e["choices"][0]["delta"] for e in data_events(await r.text()) if e != "[DONE]"]
                assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
                assert "".join(d.get("content") or "" for d in deltas) == "It is 42."
                assert not any(d.get("content") and d.get("reasoning_content") for d in deltas)

    run(body())


class FakeToolbox:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def list_tools(self) -> list[dict]:
        return [{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]

    def call(self, name: str, arguments: dict) -> str:
        self.calls.append((name, arguments))
        return f"found {arguments['q']}"


def test_server_side_tool_loop(tokenizer):
    toolbox = FakeToolbox()

    def script(req: Any) -> list[Any]:
        prompt = tokenizer.decode(req.prompt_ids)
        if "found" not in prompt:  # round 1: call the server-side tool
            return script_for(tokens("Looking. ", call_text("lookup", {"q": "cats"})))
        return script_for(tokens("Cats ", "purr."))

    async def body():
        svc = ToolService(tokenizer, script)
        async with client_for(svc, tools=ToolConfig(toolbox=toolbox)) as c:
            r = await c.post("/v1/chat/completions", json=chat(tool_choice="required"))
            res = await r.json()
            (choice,) = res["choices"]
            assert choice["message"]["content"] == "Looking.\n\nCats purr." and choice["message"]["tool_calls"] is None
            assert choice["finish_reason"] == "stop"
            assert res["agentic_tool_calls"] == [{"round": 0, "name": "lookup", "arguments": '{"q": "cats"}',
                                                  "result_content": "found cats"}]
            assert toolbox.calls == [("lookup", {"q": "cats"})]
            assert res["usage"]["completion_tokens"] == 2 + 2  # summed over the two rounds
            first, second = svc.engine.requests[-2:]
            assert first.grammar is not None and second.grammar is None  # required on round 1 only
            # The second prompt holds the assistant call and the tool result.
            assert svc.rendered[-1][-2]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": {"q": "cats"}}
            assert svc.rendered[-1][-1] == {"role": "tool", "tool_call_id": svc.rendered[-1][-2]["tool_calls"][0]["id"],
                                            "name": "lookup", "content": "found cats"}
            r = await c.post("/v1/chat/completions", json=chat(tool_choice="required", stream=True))
            chunks = [e for e in data_events(await r.text()) if e != "[DONE]"]
            deltas = [ch["choices"][0]["delta"] for ch in chunks]
            assert "".join(d.get("content") or "" for d in deltas) == "Looking.\n\nCats purr."
            assert not any(d.get("tool_calls") for d in deltas)
            (finish,) = [ch for ch in chunks if ch["choices"][0]["finish_reason"]]
            assert finish["agentic_tool_calls"][0]["name"] == "lookup"
            assert "agentic_tool_calls" not in chunks[0]
            # max_tool_rounds 0: the tool is not offered, nothing runs.
            before = len(toolbox.calls)
            r = await c.post("/v1/chat/completions", json=chat(max_tool_rounds=0))
            assert "agentic_tool_calls" not in await r.json() and len(toolbox.calls) == before
            # Responses API: same loop.
            r = await c.post("/v1/responses", json={"input": "cats?", "tool_choice": "required"})
            resp = await r.json()
            assert resp["output_text"] == "Looking.\n\nCats purr." and [o["type"] for o in resp["output"]] == ["message"]

    run(body())


def test_responses_function_calls_reasoning_and_text_format(tokenizer):
    output = ["<think>", "plan", "</think>", "Sure.", call_text("add", {"a": 1, "b": 2})]

    async def body():
        svc = ToolService(tokenizer, lambda req: script_for(tokens(*output)))
        async with client_for(svc) as c:
            flat = [{"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}]
            r = await c.post("/v1/responses", json={"input": "1+2?", "tools": flat})
            resp = await r.json()
            assert [o["type"] for o in resp["output"]] == ["reasoning", "message", "function_call"]
            assert resp["output"][0]["content"] == [{"type": "reasoning_text", "text": "plan"}]
            fc = resp["output"][2]
            assert (fc["name"], fc["arguments"], fc["status"]) == ("add", '{"a": 1, "b": 2}', "completed")
            assert fc["call_id"].startswith("call-") and resp["output_text"] == "Sure."
            # Chaining: the stored turn carries the call; the function output follows it.
            r = await c.post("/v1/responses", json={"previous_response_id": resp["id"], "tools": flat, "input": [
                {"type": "function_call_output", "call_id": fc["call_id"], "output": "3"}]})
            assert r.status == 200
            rendered = svc.rendered[-1]
            assert rendered[-2]["tool_calls"][0]["id"] == fc["call_id"] and rendered[-1]["role"] == "tool"
            r = await c.post("/v1/responses", json={"input": "1+2?", "tools": flat, "stream": True})
            events = data_events(await r.text())
            kinds = [e["type"] for e in events]
            assert kinds == [
                "response.created", "response.in_progress",
                "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                "response.output_text.done", "response.content_part.done", "response.output_item.done",
                "response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
            assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
            final = events[-1]["response"]
            assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
            assert events[-4]["delta"] == '{"a": 1, "b": 2}'
            # text.format becomes the json_schema constraint.
            fmt = {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}
            r = await c.post("/v1/responses", json={"input": "x", "text": {"format": fmt}})
            assert r.status == 200 and svc.engine.requests[-1].grammar.kind == "json_schema"
            assert (await r.json())["text"] == {"format": fmt}

    run(body())


def test_grammar_and_response_format_reach_the_engine(tokenizer):
    async def body():
        svc = ToolService(tokenizer)
        async with client_for(svc) as c:
            r = await c.post("/v1/completions", json={"prompt": "x", "grammar": {"type": "regex", "value": "a+"}})
            assert r.status == 200 and svc.engine.requests[-1].grammar == GrammarSpec("regex", "a+")
            schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
            r = await c.post("/v1/chat/completions", json=chat(response_format={
                "type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}))
            assert r.status == 200 and svc.engine.requests[-1].grammar.value == schema

    run(body())


# -- the Python API ---------------------------------------------------------------------------------------
def test_python_api_request_fields():
    from mistralrs.api import ChatCompletionRequest, CompletionRequest, ToolChoice
    from mistralrs.engine.constraints import ConstraintError

    body = ChatCompletionRequest(messages="hi", grammar="[0-9]+", grammar_type="regex",
                                 tool_schemas=[json.dumps(WEATHER)], tools=[ADD], tool_choice=ToolChoice.Required,
                                 max_tool_rounds=3).to_body()
    assert body["grammar"] == {"type": "regex", "value": "[0-9]+"}
    assert body["tools"] == [WEATHER, ADD] and body["tool_choice"] == "required" and body["max_tool_rounds"] == 3
    assert CompletionRequest(prompt="x", grammar='{"type": "object"}', grammar_type="json_schema").to_body()[
        "grammar"] == {"type": "json_schema", "value": {"type": "object"}}
    with pytest.raises(ConstraintError) as err:
        ChatCompletionRequest(messages="hi", grammar="x").to_body()
    assert err.value.param == "grammar_type"
    with pytest.raises(ConstraintError):
        CompletionRequest(prompt="x", grammar="x", grammar_type="yaml").to_body()


# -- CLI flags ----------------------------------------------------------------------------------------------
def test_cli_tool_flags():
    from mistralrs.errors import ConfigError
    from mistralrs_plugins.frontends.interactive import chat as interactive_mode
    from mistralrs_plugins.frontends.openai_server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["-m", "x", "--tool-parser", "hermes", "--reasoning-parser", "none",
                              "--max-tool-rounds", "300", "--enable-tool-sources"])
    assert (args.tool_parser, args.reasoning_parser, args.enable_tool_sources) == ("hermes", "none", "all")
    config = cli.tool_config_from_args(args)
    assert config.tool_parser == "hermes" and config.max_tool_rounds == 256 and config.toolbox is not None
    assert parser.parse_args(["-m", "x"]).max_tool_rounds == 8
    with pytest.raises(ConfigError, match="no parser named 'nope'"):
        cli.tool_config_from_args(parser.parse_args(["-m", "x", "--tool-parser", "nope"]))
    with pytest.raises(ConfigError, match="no tool source"):
        cli.tool_config_from_args(parser.parse_args(["-m", "x", "--enable-tool-sources", "nope"]))
    run_parser = argparse.ArgumentParser()
    interactive_mode.add_arguments(run_parser)
    assert run_parser.parse_args(["-m", "x", "--tool-parser", "llama3"]).tool_parser == "llama3"


# -- interactive mode ----------------------------------------------------------------------------------------
class SyncHandle:
    def __init__(self, events: list[Any]) -> None:
        self.events, self.done, self.cancelled = events, False, False

    def __iter__(self):
        yield from self.events
        self.done = True

    def cancel(self) -> None:
        self.cancelled = True


def test_interactive_mode_shows_thinking_dimmed(tokenizer):
    from mistralrs_plugins.frontends.interactive.chat import DIM, RESET, InteractiveChat

    svc = ToolService(tokenizer)
    parts = ["<think>", "Hmm", "</think>", "\n\nHello!"]
    finished = ChoiceFinished(0, "stop", "".join(parts), ())
    events = [TokenDelta(0, p, (5,)) for p in parts] + [finished, RequestDone(usage(), (finished,))]
    svc.engine = types.SimpleNamespace(submit=lambda gen, loop=None: SyncHandle(events))
    for color in (True, False):
        out = io.StringIO()
        chat_ = InteractiveChat(svc, out=out, color=color)
        assert chat_.answer("hi") == "Hello!"
        text = out.getvalue()
        assert text == (f"{DIM}Hmm{RESET}\nHello!\n" if color else "Hmm\nHello!\n")
        assert chat_.history[-1] == {"role": "assistant", "content": "Hello!"}
    assert InteractiveChat(svc, out=io.StringIO()).color is False  # not a terminal
