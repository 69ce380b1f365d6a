"""Tool-call and reasoning parsers: real-format samples of each family, malformed input,
streaming == one-shot for every way of splitting an output, and parser selection."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistralrs.errors import NotFoundError
from mistralrs.parsing import (
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    make_reasoning_parser,
    make_tool_parser,
    merge_tool_call_deltas,
    normalize_arguments,
    select_reasoning_parser,
    select_tool_parser,
)
from mistralrs.plugins import PluginHost
from mistralrs_plugins.parsers import deepseek, hermes, hunyuan, json_fallback, liquid, llama3, mistral, think
from mistralrs_plugins.parsers.deepseek.parser import DeepSeekToolParser
from mistralrs_plugins.parsers.hermes.parser import HermesToolParser
from mistralrs_plugins.parsers.hunyuan.parser import HunyuanToolParser
from mistralrs_plugins.parsers.json_fallback.parser import JsonToolParser
from mistralrs_plugins.parsers.liquid.parser import LiquidToolParser
from mistralrs_plugins.parsers.llama3.parser import Llama3ToolParser
from mistralrs_plugins.parsers.mistral.parser import MistralToolParser
from mistralrs_plugins.parsers.think.parser import ThinkReasoningParser
from tests.helpers.fake_plugins import dist

PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser,
    "llama3": Llama3ToolParser,
    "mistral": MistralToolParser,
    "deepseek": DeepSeekToolParser,
    "json": JsonToolParser,
    "liquid": LiquidToolParser,
    "hunyuan": HunyuanToolParser,
}
REGISTRATION_MODULES = {
    "parser_hermes": hermes,
    "parser_llama3": llama3,
    "parser_mistral": mistral,
    "parser_deepseek": deepseek,
    "parser_json": json_fallback,
    "parser_liquid": liquid,
    "parser_hunyuan": hunyuan,
    "reasoning_think": think,
}

# DeepSeek's special tokens use U+FF5C (fullwidth bar) and U+2581 (lower one eighth block).
DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"


def ds_v3_call(name: str, args: str) -> str:
    return f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n{args}\n```{DS_CALL_END}"


# (parser, model output, expected content, expected calls as (name, arguments dict))
SAMPLES: list[tuple[str, str, str, list[tuple[str, dict]]]] = [
    # --- Hermes / Qwen 2.5 / Qwen 3 -------------------------------------------------------
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": '
        '{"location": "San Francisco, CA, USA", "unit": "celsius"}}\n</tool_call>',
        "",
        [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"})],
    ),
    (
        "hermes",
        "I'll check the weather in both cities.\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
        "I'll check the weather in both cities.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Zürich"})],
    ),
    (
        "hermes",  # arguments as a JSON string, no arguments at all, closing tag cut off at the end
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
        '<tool_call>{"name": "now"}</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n',
        "",
        [("add", {"a": 1, "b": 2}), ("now", {}), ("ping", {})],
    ),
    (
        "hermes",  # text after the call stays content
        'Calling it.<tool_call>{"name": "f", "arguments": {"x": [1, {"y": "}"}]}}</tool_call>\nDone.',
        "Calling it.\nDone.",
        [("f", {"x": [1, {"y": "}"}]})],
    ),
    ("hermes", "Paris is the capital of France.", "Paris is the capital of France.", []),
    (
        "hermes",  # the bare-JSON fallback: markers dropped
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    # --- HunYuan ------------------------------------------------------------------------------
    (
        "hunyuan",
        'Let me look both up.\n<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Zürich"}}]</tool_calls>',
        "Let me look both up.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Zürich"})],
    ),
    (
        "hunyuan",  # a single object, arguments as a JSON string, the closing tag cut off at the end
        '<tool_calls>{"name": "add", "arguments": "{\\"a\\": 1}"}',
        "",
        [("add", {"a": 1})],
    ),
    ("hunyuan", "No tools needed.", "No tools needed.", []),
    # --- Liquid (LFM2 / LFM2.5) ---------------------------------------------------------
    (
        "liquid",
        '<|tool_call_start|>[get_candidate_status(candidate_id="12345")]<|tool_call_end|>'
        "Checking the current status of candidate ID 12345.",
        "Checking the current status of candidate ID 12345.",
        [("get_candidate_status", {"candidate_id": "12345"})],
    ),
    (
        "liquid",  # two calls, Python and JSON literals, nested values, a non-identifier name through **
        "Let me look.\n<|tool_call_start|>[search(query='rust, \\'quoted\\'', limit=3, exact=True),"
        ' set_flags(flags={"a b": [1, -2.5, null]}, on=false, **{"x-y": None})]<|tool_call_end|>',
        "Let me look.",
        [("search", {"query": "rust, 'quoted'", "limit": 3, "exact": True}),
         ("set_flags", {"flags": {"a b": [1, -2.5, None]}, "on": False, "x-y": None})],
    ),
    ("liquid", "<|tool_call_start|>[now()]", "", [("now", {})]),  # closing marker cut off at the end
    # --- Llama 3.1+ ----------------------------------------------------------------------
    (
        "llama3",
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
        "",
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
    ),
    (
        "llama3",
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Tokyo"}}',
        "",
        [("get_weather", {"city": "Tokyo"})],
    ),
    (
        "llama3",
        '\n{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        "",
        [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    (
        "llama3",
        'Let me look that up. <|python_tag|>{"name": "search", "parameters": {"query": "llama 3.1"}}',
        "Let me look that up.",
        [("search", {"query": "llama 3.1"})],
    ),
    (
        "llama3",
        '[{"name": "a", "parameters": {}}, {"name": "b", "arguments": {"k": null}}]',
        "",
        [("a", {}), ("b", {"k": None})],
    ),
    ("llama3", "The weather in Paris is sunny, 24°C.", "The weather in Paris is sunny, 24°C.", []),
    (
        "llama3",  # built-in tool code after python_tag is not a JSON call
        '<|python_tag|>brave_search.call(query="current weather in Menlo Park")',
        '<|python_tag|>brave_search.call(query="current weather in Menlo Park")',
        [],
    ),
    # --- Mistral ------------------------------------------------------------------------
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]',
        "",
        [("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
    ),
    (
        "mistral",
        'I\'ll check.[TOOL_CALLS] [{"name": "search", "arguments": {"query": "rust"}}, '
        '{"name": "search", "arguments": {"query": "python"}}]',
        "I'll check.",
        [("search", {"query": "rust"}), ("search", {"query": "python"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris", "unit": "celsius"}',
        "",
        [("get_weather", {"location": "Paris", "unit": "celsius"})],
    ),
    (
        "mistral",
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"location": "Paris"}'
        '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}',
        "Sure.",
        [("get_weather", {"location": "Paris"}), ("get_time", {})],
    ),
    ("mistral", "Bonjour ! [1] Comment puis-je aider ?", "Bonjour ! [1] Comment puis-je aider ?", []),
    # --- DeepSeek -----------------------------------------------------------------------
    (
        "deepseek",
        DS_CALLS_BEGIN + ds_v3_call("get_weather", '{"location": "Hangzhou"}') + DS_CALLS_END,
        "",
        [("get_weather", {"location": "Hangzhou"})],
    ),
    (
        "deepseek",
        "Let me check both.\n\n" + DS_CALLS_BEGIN + ds_v3_call("get_weather", '{"location": "Hangzhou"}') + "\n"
        + ds_v3_call("get_time", '{\n  "tz": "Asia/Shanghai"\n}') + DS_CALLS_END,
        "Let me check both.",
        [("get_weather", {"location": "Hangzhou"}), ("get_time", {"tz": "Asia/Shanghai"})],
    ),
    (
        "deepseek",  # V3.1
        f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{"location": "Beijing"}}{DS_CALL_END}{DS_CALLS_END}',
        "",
        [("get_weather", {"location": "Beijing"})],
    ),
    (
        "deepseek",  # the outer end marker cut off at the end of the output
        DS_CALLS_BEGIN + ds_v3_call("f", "{}"),
        "",
        [("f", {})],
    ),
    ("deepseek", "2 + 2 = 4.", "2 + 2 = 4.", []),
    # --- generic JSON -------------------------------------------------------------------
    ("json", '{"name": "get_weather", "arguments": {"city": "Lima"}}', "", [("get_weather", {"city": "Lima"})]),
    (
        "json",
        '```json\n[{"function": "a", "parameters": {"x": 1}}, '
        '{"type": "function", "function": {"name": "b", "arguments": "{\\"y\\": 2}"}}]\n```',
        "",
        [("a", {"x": 1}), ("b", {"y": 2})],
    ),
    (
        "json",
        'I will call the tool:\n```json\n{"name": "lookup", "arguments": {"id": 7}}\n```\nThen I will answer.',
        "I will call the tool:\nThen I will answer.",
        [("lookup", {"id": 7})],
    ),
    ("json", '{"answer": 42, "unit": "none"}', '{"answer": 42, "unit": "none"}', []),
    ("json", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("json", "```python\nprint('hi')\n```", "```python\nprint('hi')\n```", []),
    ("json", "   ", "   ", []),
    ("json", "", "", []),
]

# Malformed or truncated tool syntax: plain content, verbatim, never an exception.
MALFORMED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>'),
    ("hermes", "<tool_call>not json at all</tool_call>"),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a'),  # cut off by max_tokens
    ("hermes", '<tool_call>{"name": "f", "arguments": {}} and then more</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {"a": 1}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    ("hermes", 'Use <tool_call> tags like <tool_call>this</tool_call>.'),
    ("hunyuan", '<tool_calls>[{"name": "f", "arguments": {"a": 1}]</tool_calls>'),
    ("hunyuan", '<tool_calls>[{"name": "f", "arguments": {}}] trailing</tool_calls>'),
    ("hunyuan", "<tool_calls>not json</tool_calls>"),
    ("liquid", "<|tool_call_start|>[f(1, 2)]<|tool_call_end|>"),  # positional arguments
    ("liquid", "<|tool_call_start|>[f(a=open('x'))]<|tool_call_end|>"),  # not a literal
    ("liquid", "<|tool_call_start|>f(a=1)<|tool_call_end|>"),  # not a list
    ("liquid", '<|tool_call_start|>[f(a="1)]<|tool_call_end|>'),
    ("liquid", "<|tool_call_start|>[f(a=1) g()]<|tool_call_end|>"),
    ("liquid", "<|tool_call_start|>[]<|tool_call_end|>"),
    ("llama3", '{"name": "f", "parameters": {"a": }}'),
    ("llama3", '{"name": "f", "parameters": {"a": 1}'),
    ("llama3", '{"name": "f", "parameters": {}}; not a call'),
    ("llama3", "<|python_tag|>"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {]'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"location": '),
    ("mistral", "[TOOL_CALLS]get_weather{}"),
    ("mistral", "[TOOL_CALLS]"),
    ("deepseek", DS_CALLS_BEGIN + f"{DS_CALL_BEGIN}function{DS_SEP}f\n{{}}\n{DS_CALL_END}{DS_CALLS_END}"),
    ("deepseek", DS_CALLS_BEGIN + ds_v3_call("f", '{"a": nope}') + DS_CALLS_END),
    ("deepseek", DS_CALLS_BEGIN + DS_CALLS_END),
    ("json", '{"name": "f", "arguments": [1, 2]}'),
    ("json", '{"name": "f", "arguments": {}, "extra": true}'),
    ("json", '[]'),
    ("json", '{"name": "f"}'),
    ("json", '```json\n{"name": "f", "arguments": {}}\nnot closed'),
]


def calls_of(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def stream(parser: ToolCallParser, pieces: list[str]) -> tuple[list[str], list[ToolCallDelta]]:
    contents, deltas = [], []
    for piece in pieces:
        c, d = parser.feed(piece)
        contents.append(c)
        deltas.extend(d)
    c, d = parser.finish()
    contents.append(c)
    deltas.extend(d)
    return contents, deltas


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


def assert_stream_matches(parser_cls: type[ToolCallParser], text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    expected = parser_cls().parse(text)
    contents, deltas = stream(parser_cls(), pieces)
    assert "".join(contents) == expected.content
    merged = merge_tool_call_deltas(deltas)
    assert [(c.name, c.arguments) for c in merged] == [(c.name, c.arguments) for c in expected.tool_calls]
    assert [d.index for d in deltas] == sorted(d.index for d in deltas)
    for call in merged:
        assert call.id.startswith("call-")


# --------------------------------------------------------------------------------------
# One-shot parsing
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser,text,content,calls", SAMPLES)
def test_parse_real_formats(parser, text, content, calls):
    out = PARSERS[parser]().parse(text)
    assert isinstance(out, ParsedOutput)
    assert out.content == content
    assert calls_of(out.tool_calls) == calls
    for call in out.tool_calls:
        assert isinstance(call.arguments, str)
        assert call.id.startswith("call-") and len(call.id) > 10
    assert len({c.id for c in out.tool_calls}) == len(out.tool_calls)


@pytest.mark.parametrize("parser,text", MALFORMED)
def test_malformed_tool_syntax_is_content(parser, text):
    out = PARSERS[parser]().parse(text)
    assert out.tool_calls == []
    assert out.content == text


def test_arguments_are_normalised_json_strings():
    out = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": {"city": "Zürich", "n": 1.5}}</tool_call>')
    assert out.tool_calls[0].arguments == '{"city": "Zürich", "n": 1.5}'  # ensure_ascii=False
    kept = '{"a":1}'
    out = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\":1}"}</tool_call>')
    assert out.tool_calls[0].arguments == kept  # a string holding JSON is kept as written
    assert normalize_arguments(None) == "{}"
    assert normalize_arguments("") == "{}"
    assert normalize_arguments("[1]") is None
    assert normalize_arguments(3) is None


def test_parse_does_not_disturb_streaming_state():
    parser = HermesToolParser()
    parser.feed("Hi <tool_")
    assert parser.parse("plain").content == "plain"
    content, deltas = parser.feed('call>{"name": "f", "arguments": {}}</tool_call>')
    tail, more = parser.finish()
    assert (content + tail, [d.name for d in deltas + more]) == ("", ["f"])


def test_families_do_not_see_each_others_markers():
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert MistralToolParser().parse(text).content == text
    assert Llama3ToolParser().parse("[TOOL_CALLS]" + '[{"name": "f", "arguments": {}}]').tool_calls == []


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser,text", [(p, t) for p, t, _, _ in SAMPLES] + MALFORMED)
def test_streaming_one_character_at_a_time(parser, text):
    assert_stream_matches(PARSERS[parser], text, list(text))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from([(p, t) for p, t, _, _ in SAMPLES] + MALFORMED),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_streaming_any_split_matches_parse(sample, cuts):
    parser, text = sample
    assert_stream_matches(PARSERS[parser], text, split(text, cuts))


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "</tool", "[TOOL_CALLS]", "[TOOL_", "[ARGS]", "[CALL_ID]",
    "<|python_tag|>", "<|python", DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END, DS_SEP,
    "function", "```json", "```", "`", '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}',
    '{"name": ', '"f"', '"arguments": ', "{", "}", "[", "]", '"', "\\", ":", ",", ";", " ", "\n", "  ",
    "get_weather", "Hello", "ü", "{}", '{"a": "}"}',
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parser=st.sampled_from(sorted(PARSERS)),
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=14),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10),
)
def test_streaming_matches_parse_on_arbitrary_text(parser, parts, cuts):
    text = "".join(parts)
    out = PARSERS[parser]().parse(text)  # never raises
    if not out.tool_calls:
        assert out.content == text
    for call in out.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    assert_stream_matches(PARSERS[parser], text, split(text, cuts))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    parser=st.sampled_from(sorted(PARSERS)),
    names=st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,20}", fullmatch=True), min_size=1, max_size=3),
    args=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
    before=st.sampled_from(["", "Let me check.\n\n", "On it: "]),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_render_call_round_trips(parser, names, args, before, cuts):
    """What a family's model writes for a call (`render_call`) parses back, with any
    arguments (unicode, nested, quotes and braces in strings), one call per name."""
    cls = PARSERS[parser]
    arguments = json.dumps(args, ensure_ascii=False)
    text = "".join(cls().render_call(name, arguments) for name in names)
    if parser in ("json", "llama3"):
        before = ""  # bare JSON is only a call at the very start of the output
        text = "; ".join(cls().render_call(name, arguments) for name in names)
    out = cls().parse(before + text)
    assert out.content == before.rstrip()
    assert [(c.name, c.arguments) for c in out.tool_calls] == [(name, arguments) for name in names]
    assert_stream_matches(cls, before + text, split(before + text, cuts))


def test_content_streams_before_the_call_completes():
    parser = HermesToolParser()
    content, deltas = parser.feed('Let me check.\n<tool_call>\n{"name": "get_wea')
    assert (content, deltas) == ("Let me check.", [])
    content, deltas = parser.feed('ther", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content == ""
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "get_weather", '{"city": "Paris"}')]
    assert deltas[0].id.startswith("call-")
    assert parser.finish() == ("", [])


def test_held_back_text_is_released_when_it_is_not_a_marker():
    parser = HermesToolParser()
    assert parser.feed("Use a <tool") == ("Use a", [])  # "<tool" might open <tool_call>; " " waits too
    assert parser.feed("box>") == (" <toolbox>", [])
    parser = MistralToolParser()
    assert parser.feed("See [TOOL") == ("See", [])
    assert parser.feed("S] here") == (" [TOOLS] here", [])
    parser = Llama3ToolParser()
    assert parser.feed("  ") == ("", [])  # leading space: a JSON call may follow
    assert parser.feed("The answer is 4.") == ("  The answer is 4.", [])
    parser = Llama3ToolParser()
    assert parser.feed("{name} is") == ("{name} is", [])  # not a JSON object: decided at once
    parser = JsonToolParser()
    assert parser.feed('{"name": "f", "arguments": {}') == ("", [])
    content, deltas = parser.feed("} extra")  # the call is decided at its closing brace
    assert content == "extra" and [d.name for d in deltas] == ["f"]
    assert parser.finish() == ("", [])


def test_finish_releases_an_unfinished_call_as_content():
    parser = MistralToolParser()
    assert parser.feed('[TOOL_CALLS][{"name": "f", "argu') == ("", [])
    assert parser.finish() == ('[TOOL_CALLS][{"name": "f", "argu', [])


def test_merge_tool_call_deltas_like_a_client():
    deltas = [
        ToolCallDelta(0, "call-1", "f", '{"a": '),
        ToolCallDelta(1, "call-2", "g", "{}"),
        ToolCallDelta(0, None, None, "1}"),
    ]
    assert merge_tool_call_deltas(deltas) == [ToolCall("call-1", "f", '{"a": 1}'), ToolCall("call-2", "g", "{}")]


# --------------------------------------------------------------------------------------
# Reasoning
# --------------------------------------------------------------------------------------
REASONING_SAMPLES = [
    # (starts_in_reasoning, output, reasoning_content, content)
    (False, "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4.", "The user wants 2+2. That is 4.",
     "The answer is 4."),
    (False, "No thinking here.", None, "No thinking here."),
    (False, "<think>\n\n</think>\n\nShort answer.", None, "Short answer."),  # Qwen3 with thinking off
    (False, "Intro <think>first</think> middle <think>second</think> end", "first\nsecond", "Intro middle end"),
    (False, "<think>cut off by max_tokens", "cut off by max_tokens", ""),
    (False, "a < b and x </thinking> y", None, "a < b and x </thinking> y"),
    (True, "Let me think.\n</think>\n\nHello!", "Let me think.", "Hello!"),  # prompt ended in <think>
    (True, "<think>\nrepeated open tag</think>Hi", "repeated open tag", "Hi"),
    (True, "still thinking", "still thinking", ""),
    (True, "</think>Direct", None, "Direct"),
]


@pytest.mark.parametrize("prefilled,text,reasoning,content", REASONING_SAMPLES)
def test_reasoning_split(prefilled, text, reasoning, content):
    assert ThinkReasoningParser(starts_in_reasoning=prefilled).parse(text) == (reasoning, content)


@settings(max_examples=300, deadline=None)
@given(
    sample=st.sampled_from(REASONING_SAMPLES),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=10),
)
def test_reasoning_streamed_matches_parse(sample, cuts):
    prefilled, text, reasoning, content = sample
    parser = ThinkReasoningParser(starts_in_reasoning=prefilled)
    r_parts, c_parts = [], []
    for piece in split(text, cuts):
        r, c = parser.feed(piece)
        r_parts.append(r)
        c_parts.append(c)
    r, c = parser.finish()
    assert ("".join(r_parts) + r or None, "".join(c_parts) + c) == (reasoning, content)


@settings(max_examples=300, deadline=None)
@given(
    prefilled=st.booleans(),
    parts=st.lists(st.sampled_from(["<think>", "</think>", "<thi", "</th", "<", "/", "a", " ", "\n", "ok"]),
                   max_size=14),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=10),
)
def test_reasoning_streaming_on_arbitrary_text(prefilled, parts, cuts):
    text = "".join(parts)
    expected = ThinkReasoningParser(starts_in_reasoning=prefilled).parse(text)
    parser = ThinkReasoningParser(starts_in_reasoning=prefilled)
    out = [parser.feed(p) for p in split(text, cuts)] + [parser.finish()]
    assert ("".join(r for r, _ in out) or None, "".join(c for _, c in out)) == expected


def test_reasoning_streams_as_it_goes():
    parser = ThinkReasoningParser()
    assert parser.feed("<think>Step one") == ("Step one", "")
    assert parser.feed(". Step two.</th") == (". Step two.", "")
    assert parser.feed("ink>\n\nAnswer") == ("", "Answer")
    assert parser.finish() == ("", "")


def test_prompt_opens_reasoning():
    assert ThinkReasoningParser.prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not ThinkReasoningParser.prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not ThinkReasoningParser.prompt_opens_reasoning("<|im_start|>assistant\n")


def test_reasoning_then_tool_calls_pipeline():
    """The server's order: reasoning first, its content stream into the tool parser."""
    text = '<think>I need the weather.</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    reasoning, content = ThinkReasoningParser().parse(text)
    out = HermesToolParser().parse(content)
    assert reasoning == "I need the weather."
    assert (out.content, calls_of(out.tool_calls)) == ("", [("get_weather", {"city": "Rome"})])


# --------------------------------------------------------------------------------------
# Registration and selection
# --------------------------------------------------------------------------------------
def first_party_host() -> PluginHost:
    """A host whose `mistralrs` distribution carries exactly the parser entry points."""
    return PluginHost(distributions=lambda: [dist("mistralrs", "0.1.0", **REGISTRATION_MODULES)], environ={},
                      internal=())


@pytest.fixture(scope="module")
def registry():
    return first_party_host().registry()


def test_parsers_register_through_a_plugin_host(registry):
    assert registry.tool_parsers.names() == ["deepseek", "hermes", "hunyuan", "json", "liquid", "llama3", "mistral"]
    assert registry.reasoning_parsers.names() == ["think"]
    for name, cls in PARSERS.items():
        parser = make_tool_parser(registry.tool_parsers.get(name))
        assert type(parser) is cls
    reasoner = make_reasoning_parser(registry.reasoning_parsers.get("think"), starts_in_reasoning=True)
    assert reasoner.parse("x</think>y") == ("x", "y")


def test_first_party_entry_points_when_installed():
    names = {ep.name for ep in importlib.metadata.distribution("mistralrs").entry_points if ep.group == "mistralrs"}
    if not set(REGISTRATION_MODULES) <= names:
        pytest.skip("parser entry points are not in pyproject.toml yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry = PluginHost().registry()
    assert {"hermes", "hunyuan", "llama3", "mistral", "deepseek", "json", "liquid"} <= set(registry.tool_parsers.names())
    assert "think" in registry.reasoning_parsers.names()


def test_registration_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        "import mistralrs_plugins.parsers.hermes, mistralrs_plugins.parsers.llama3, mistralrs_plugins.parsers.mistral\n"
        "import mistralrs_plugins.parsers.deepseek, mistralrs_plugins.parsers.json_fallback, mistralrs_plugins.parsers.liquid\n"
        "import mistralrs_plugins.parsers.think\n"
        "heavy = [m for m in sys.modules if m == 'torch' or (m.startswith('mistralrs_plugins.parsers.') and m.endswith('.parser'))]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("model_type,parser", [
    ("qwen2", "hermes"), ("qwen3", "hermes"), ("qwen3_moe", "hermes"), ("smollm3", "hermes"),
    ("llama", "llama3"), ("mistral", "mistral"), ("mixtral", "mistral"), ("deepseek_v3", "deepseek"),
    ("lfm2", "liquid"),
    ("phi3", "json"), ("gemma2", "json"), (None, "json"), ("Qwen2", "hermes"),
])
def test_select_tool_parser_by_model_type(registry, model_type, parser):
    assert select_tool_parser(registry, model_type=model_type, chat_template=None).name == parser


@pytest.mark.parametrize("template,parser", [
    ("{%- if tools %}<tool_call>\\n{{ tool_call | tojson }}\\n</tool_call>{%- endif %}", "hermes"),
    ("{{- '[AVAILABLE_TOOLS] ' + tools|tojson + '[/AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS] ' }}", "mistral"),
    ('{{- "<|python_tag|>" + tool_call.name + ".call(" }}', "llama3"),
    ("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'}}", "deepseek"),
    ("{{- '<|tool_call_start|>' + tool_calls + '<|tool_call_end|>' }}", "liquid"),
    ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", "json"),
])
def test_select_tool_parser_by_template_markers(registry, template, parser):
    assert select_tool_parser(registry, model_type=None, chat_template=template).name == parser


def test_template_markers_beat_model_type(registry):
    # NousResearch Hermes-2-Pro-Mistral: a Mistral model trained on Hermes <tool_call> tags.
    template = "<|im_start|>system ... <tool_call>\n{'arguments': <args-dict>, 'name': <function-name>}\n</tool_call>"
    assert select_tool_parser(registry, model_type="mistral", chat_template=template).name == "hermes"
    # A template without tool markers falls back to the model type.
    assert select_tool_parser(registry, model_type="mistral", chat_template="{{ messages }}").name == "mistral"


def test_select_tool_parser_override(registry):
    assert select_tool_parser(registry, model_type="qwen2", chat_template="<tool_call>", override="llama3").name == "llama3"
    with pytest.raises(NotFoundError, match="hermes"):
        select_tool_parser(registry, model_type=None, chat_template=None, override="nope")


def test_third_party_parser_with_higher_priority_wins():
    from mistralrs import hookimpl
    from mistralrs.specs import ToolCallParserSpec

    class Better:
        @hookimpl
        def register_tool_parsers(self, register):
            register(ToolCallParserSpec(name="qwen-better", parser="x:Y", model_types=("qwen2",), priority=10))

    host = first_party_host()
    host.load()
    host.register(Better(), name="better")
    assert select_tool_parser(host.registry(), model_type="qwen2", chat_template=None).name == "qwen-better"
    assert select_tool_parser(host.registry(), model_type="qwen3", chat_template=None).name == "hermes"


@pytest.mark.parametrize("model_type,template,override,expected", [
    ("qwen3", None, None, "think"),
    ("deepseek_v3", None, None, "think"),
    ("smollm3", None, None, "think"),
    ("qwen2", "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}", None,
     "think"),  # QwQ / R1-distills: model_type qwen2, thinking template
    ("llama", "{{ messages }}", None, None),
    (None, None, None, None),
    ("qwen3", None, "none", None),
    ("llama", None, "think", "think"),
])
def test_select_reasoning_parser(registry, model_type, template, override, expected):
    spec = select_reasoning_parser(registry, model_type=model_type, chat_template=template, override=override)
    assert (spec.name if spec else None) == expected


# -- Harmony (GPT-OSS) ---------------------------------------------------------------------------
HARMONY_SAMPLES = [
    ("<|channel|>analysis<|message|>We think hard.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.",
     "We think hard.", "It is 4."),
    ("<|channel|>final<|message|>Only an answer.", None, "Only an answer."),
    ("<|channel|>analysis<|message|>cut off while thinking", "cut off while thinking", ""),
    ("no header at all", None, "no header at all"),
    ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>Done.",
     None, "Let me check.Done."),
]


@pytest.mark.parametrize("text,reasoning,content", HARMONY_SAMPLES)
@pytest.mark.parametrize("step", [0, 1, 2, 3, 7])
def test_harmony_channels(text, reasoning, content, step):
    from mistralrs_plugins.parsers.harmony.parser import HarmonyReasoningParser

    if step == 0:
        assert HarmonyReasoningParser().parse(text) == (reasoning, content)
        return
    parser, r, c = HarmonyReasoningParser(), "", ""
    for i in range(0, len(text), step):
        a, b = parser.feed(text[i:i + step])
        assert "<|" not in a + b  # no marker (or part of one) is ever emitted
        r, c = r + a, c + b
    a, b = parser.finish()
    assert (r + a or None, c + b) == (reasoning, content)


HARMONY_CALLS = [
    # (output, reasoning, calls): the model's forms of a call, with and without the closing token
    ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
     "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}", "Need the weather.",
     [("get_weather", {"city": "Paris"})]),
    ("<|channel|>commentary to=functions.add <|constrain|>json<|message|>{\"a\": 1, \"b\": 2}<|call|>", None,
     [("add", {"a": 1, "b": 2})]),
    ("<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{\"q\": \"x\"}", None,
     [("lookup", {"q": "x"})]),
]


@pytest.mark.parametrize("text,reasoning,calls", HARMONY_CALLS)
@pytest.mark.parametrize("step", [0, 1, 4])
def test_harmony_tool_calls_through_both_parsers(text, reasoning, calls, step):
    """The reasoning parser hands a tool-addressed message on; the tool parser reads the call."""
    from mistralrs_plugins.parsers.harmony.parser import HarmonyReasoningParser
    from mistralrs_plugins.parsers.harmony.tool_parser import HarmonyToolParser

    rp, tp = HarmonyReasoningParser(), HarmonyToolParser()
    pieces = [text] if step == 0 else [text[i:i + step] for i in range(0, len(text), step)]
    from mistralrs.parsed_calls import merge_tool_call_deltas

    r, content, deltas = "", "", []
    for piece in pieces:
        a, b = rp.feed(piece)
        c, d = tp.feed(b)
        r, content, deltas = r + a, content + c, deltas + d
    a, b = rp.finish()
    c, d = tp.feed(b)
    c2, d2 = tp.finish()
    r, content, deltas = r + a, content + c + c2, deltas + d + d2

    got = [(call.name, json.loads(call.arguments)) for call in merge_tool_call_deltas(deltas)]
    assert (r or None, content, got) == (reasoning, "", calls)


def test_harmony_render_call_round_trips():
    from mistralrs_plugins.parsers.harmony.tool_parser import HarmonyToolParser

    parser = HarmonyToolParser()
    out = parser.parse(parser.render_call("get_weather", '{"city": "Oslo"}'))
    assert out.content == "" and [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "Oslo"}')]


def test_harmony_is_chosen_for_gpt_oss():
    from mistralrs.plugins import get_registry

    registry = get_registry()
    assert "gpt_oss" in registry.reasoning_parsers.get("harmony").model_types
    assert "gpt_oss" in registry.tool_parsers.get("harmony").model_types
