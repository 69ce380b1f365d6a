"""Chat templates: source priority, errors, and byte-for-byte parity with transformers'
`apply_chat_template(tokenize=False)` over realistic templates and conversations."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import pytest

from mistralrs import chat_template as chat_template_module
from mistralrs.chat_template import ChatTemplate, render_template
from mistralrs.errors import ModelLoadError, TemplateError
from tests.helpers.tiny_tokenizer import CHATML_TEMPLATE, write_tiny_tokenizer

# ----------------------------------------------------------------------------- templates
LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# gpt-oss / SmolLM3 flavoured: reasoning_effort, `thinking`, {% generation %}, dict(),
# tojson options, loop controls, strftime_now.
FEATURES = """{%- set meta = dict(effort=reasoning_effort | default('medium'), n=messages | length) -%}
<|system|>effort={{ meta.effort }} n={{ meta.n }} date={{ strftime_now('%Y') | length }}
{%- if tools %} tools={{ tools | tojson(indent=2, sort_keys=true) }} compact={{ tools[0] | tojson(separators=(',', ':')) }}{% endif %}
{%- if documents %}{% for d in documents %} [doc {{ loop.index }}: {{ d.title }}]{% endfor %}{% endif %}
{% for m in messages -%}
{%- if m.role == 'skip' %}{% continue %}{% endif -%}
<|{{ m.role }}|>
{%- if m.role == 'assistant' %}{% generation %}{% if m.thinking is defined %}[think:{{ m.thinking }}]{% endif %}{{ m.content }}{% endgeneration %}
{%- else %}{{ m.content if m.content is string else m.content | map(attribute='text') | join(' ') }}{% endif %}
{% if m.role == 'stop' %}{% break %}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}
{{ ' é ' | tojson }}{{ {'z': 1, 'a': '中'} | tojson }}"""

SPECIAL_TOKENS = {
    "llama31": dict(
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        extra_special=("<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<|eom_id|>"),
    ),
    "qwen25": dict(
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special=("<|im_start|>", "<tool_call>", "</tool_call>"),
    ),
    "qwen3": dict(
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special=("<|im_start|>",),
        added_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>"),
    ),
    "mistral": dict(bos_token="<s>", eos_token="</s>", extra_special=("[INST]", "[/INST]")),
    "gemma": dict(bos_token="<bos>", eos_token="<eos>", extra_special=("<start_of_turn>", "<end_of_turn>")),
    "phi3": dict(bos_token="<s>", eos_token="<|endoftext|>", extra_special=("<|user|>", "<|assistant|>", "<|end|>")),
    "features": dict(),
}
TEMPLATES = {
    "llama31": LLAMA31,
    "qwen25": QWEN25,
    "qwen3": QWEN3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi3": PHI3,
    "features": FEATURES,
}

# -------------------------------------------------------------------------- conversations
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city — «météo» 天气",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "noop", "description": "Does nothing", "parameters": {"type": "object", "properties": {}}},
    },
]

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
}

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello! Café? 中文 😀"}],
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant.  "},
        {"role": "user", "content": "  What is 2+2?\n"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ],
    "tool_round_trip": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 21°C and clear."},
        {"role": "user", "content": "Thanks!"},
    ],
    "tool_string_args": [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
    ],
    "reasoning": [
        {"role": "user", "content": "What is 3*7?"},
        {"role": "assistant", "content": "21", "reasoning_content": "3 times 7 is 21."},
        {"role": "user", "content": "And 3*8?"},
        {"role": "assistant", "content": "<think>\n3*8=24\n</think>\n\n24"},
    ],
    "reasoning_alias": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning": "because"},
        {"role": "user", "content": "Q2"},
    ],
    "content_parts": [
        {"role": "system", "content": [{"type": "text", "text": "System in parts."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]},
    ],
    "wrong_order": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ],
    "bad_role": [{"role": "user", "content": "hi"}, {"role": "critic", "content": "hm"}],
}


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("templates")
    return {
        name: write_tiny_tokenizer(base / name, chat_template=TEMPLATES[name], **SPECIAL_TOKENS[name])
        for name in TEMPLATES
    }


@pytest.fixture(scope="module")
def hf_tokenizers(template_dirs):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in template_dirs.items()}


@pytest.fixture(scope="module")
def ours(template_dirs) -> dict[str, ChatTemplate]:
    return {name: ChatTemplate.load(d) for name, d in template_dirs.items()}


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(chat_template_module, "_now", lambda: datetime(2024, 7, 26, 13, 5))


def _hf_render(tok, messages, **kw):
    return tok.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kw)


def _compare(hf_tok, mine: ChatTemplate, messages, **kw) -> str | None:
    """Render with both; both must agree on the text, or both must fail. Returns the text."""
    try:
        expected = _hf_render(hf_tok, messages, **kw)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises
        with pytest.raises(TemplateError):
            mine.render(messages, **kw)
        return f"<error {type(exc).__name__}>"
    before = copy.deepcopy(messages)
    got = mine.render(messages, **kw)
    assert got == expected
    assert messages == before  # the caller's messages are not modified
    return got


# ------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_parity_with_transformers(name, hf_tokenizers, ours, monkeypatch):
    import transformers.utils.chat_template_utils as hf_utils

    class FixedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 7, 26, 13, 5)

    monkeypatch.setattr(hf_utils, "datetime", FixedDatetime)
    rendered = 0
    for conv_name, messages in CONVERSATIONS.items():
        for add_generation_prompt in (True, False):
            for tools in (None, TOOLS):
                out = _compare(
                    hf_tokenizers[name],
                    ours[name],
                    messages,
                    add_generation_prompt=add_generation_prompt,
                    tools=tools,
                )
                if out is not None and not out.startswith("<error"):
                    rendered += 1
                assert out is not None, conv_name
    assert rendered >= 8, name


@pytest.mark.parametrize("enable_thinking", [True, False, None])
def test_qwen3_enable_thinking_parity(enable_thinking, hf_tokenizers, ours):
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for conv in ("user_only", "reasoning", "reasoning_alias", "tool_round_trip"):
        out = _compare(hf_tokenizers["qwen3"], ours["qwen3"], CONVERSATIONS[conv], add_generation_prompt=True, **extra)
        if enable_thinking is False:
            assert out.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        else:
            assert out.endswith("<|im_start|>assistant\n")
    out = ours["qwen3"].render(CONVERSATIONS["reasoning"], add_generation_prompt=False)
    assert "<think>\n3*8=24\n</think>\n\n24<|im_end|>" in out
    # the `reasoning` alias reaches templates as reasoning_content/thinking (transformers)
    out = ours["features"].render(CONVERSATIONS["reasoning_alias"], add_generation_prompt=False)
    assert "[think:because]A" in out


def test_llama31_python_tag_and_date_parity(hf_tokenizers, ours):
    conv = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Search for mistral.rs"},
        {
            "role": "assistant",
            "tool_calls": [
                {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "mistral.rs"}}}
            ],
        },
        {"role": "ipython", "content": "results..."},
    ]
    kw = dict(
        add_generation_prompt=True,
        builtin_tools=["brave_search", "wolfram_alpha"],
        date_string="01 Jan 2025",
        tools_in_user_message=False,
    )
    out = _compare(hf_tokenizers["llama31"], ours["llama31"], conv, tools=TOOLS, **kw)
    assert '<|python_tag|>brave_search.call(query="mistral.rs")<|eom_id|>' in out
    assert "Today Date: 01 Jan 2025" in out and out.startswith("<|begin_of_text|>")
    assert '    "type": "function"' in out  # tojson(indent=4)


def test_reasoning_effort_documents_and_controls_parity(hf_tokenizers, ours):
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "skip", "content": "invisible"},
        {"role": "assistant", "content": "yo", "thinking": "greet back"},
        {"role": "stop", "content": "halt"},
        {"role": "user", "content": "never rendered"},
    ]
    docs = [{"title": "Doc A", "text": "alpha"}, {"title": "Doc B", "text": "beta"}]
    out = _compare(
        hf_tokenizers["features"],
        ours["features"],
        conv,
        add_generation_prompt=True,
        tools=TOOLS,
        documents=docs,
        reasoning_effort="high",
    )
    assert "effort=high" in out and "[doc 2: Doc B]" in out and "invisible" not in out
    assert "never rendered" not in out and "[think:greet back]yo" in out
    assert '" é "' in out and '{"z": 1, "a": "中"}' in out  # ensure_ascii=False, no HTML escaping
    assert '"enum": [\n' in out  # tojson(indent=2, sort_keys=true)


def test_continue_final_message_parity(hf_tokenizers, ours):
    conv = CONVERSATIONS["ends_with_assistant"]
    for name in ("qwen25", "mistral", "gemma", "phi3"):
        out = _compare(hf_tokenizers[name], ours[name], conv, continue_final_message=True)
        assert out.endswith("Hello there")
    # prefill of a parts-based final message
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Sure, "}]}]
    out = _compare(hf_tokenizers["gemma"], ours["gemma"], conv, continue_final_message=True)
    assert out.endswith("<start_of_turn>model\nSure,")
    # continue_final_message wins over the add_generation_prompt=True default
    assert (
        ours["phi3"].render(CONVERSATIONS["ends_with_assistant"], continue_final_message=True).endswith("Hello there")
    )


def test_named_templates_select_tool_use_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    named = [{"name": "default", "template": PHI3}, {"name": "tool_use", "template": QWEN25}]
    d = write_tiny_tokenizer(tmp_path, chat_template=named)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    mine = ChatTemplate.load(d)
    assert mine.names == ("default", "tool_use") and mine.template == PHI3
    conv = CONVERSATIONS["system_user"]
    assert mine.render(conv) == _hf_render(hf_tok, conv, add_generation_prompt=True)
    with_tools = mine.render(conv, tools=TOOLS)
    assert with_tools == _hf_render(hf_tok, conv, add_generation_prompt=True, tools=TOOLS)
    assert "# Tools" in with_tools
    assert mine.render(conv, template_name="tool_use") == _hf_render(
        hf_tok, conv, add_generation_prompt=True, chat_template="tool_use"
    )
    with pytest.raises(TemplateError, match="no chat template named 'nope'"):
        mine.render(conv, template_name="nope")


def test_none_values_are_dropped_like_transformers(hf_tokenizers, ours):
    conv = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    ]
    out = _compare(hf_tokenizers["qwen25"], ours["qwen25"], conv, add_generation_prompt=False)
    assert "None" not in out


# ------------------------------------------------------------------------------- errors
def test_raise_exception_becomes_template_error(ours):
    with pytest.raises(TemplateError) as info:
        ours["mistral"].render(CONVERSATIONS["wrong_order"])
    assert "conversation roles must alternate user/assistant" in str(info.value)
    assert info.value.template_message.startswith("After the optional system message")
    assert info.value.http_status == 400
    with pytest.raises(TemplateError, match="Only user and assistant roles"):
        ours["mistral"].render(CONVERSATIONS["bad_role"])


def test_runtime_errors_inside_template_become_template_error():
    t = ChatTemplate.from_string("{{ messages[0]['content'] + 1 }}", source="t.jinja")
    with pytest.raises(TemplateError) as info:
        t.render([{"role": "user", "content": "x"}])
    assert "t.jinja" in str(info.value) and "\n" not in str(info.value)


def test_sandbox_blocks_escapes_and_mutation():
    escape = ChatTemplate.from_string("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate.from_string("{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(TemplateError):
        mutate.render([{"role": "user", "content": "x"}])
    ns = ChatTemplate.from_string("{% set n = namespace(_secret=1) %}{{ n._secret }}")
    with pytest.raises(TemplateError):
        ns.render([{"role": "user", "content": "x"}])


def test_strftime_now(monkeypatch):
    t = ChatTemplate.from_string("Today: {{ strftime_now('%d %B %Y') }} {{ strftime_now('%H:%M') }}")
    assert t.render([{"role": "user", "content": "x"}]) == "Today: 26 July 2024 13:05"
    monkeypatch.setattr(chat_template_module, "_now", datetime.now)
    assert t.render([{"role": "user", "content": "x"}]).startswith(f"Today: {datetime.now().strftime('%d %B %Y')}")


def test_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(TemplateError) as info:
        ChatTemplate.load(None, jinja_explicit=bad)
    msg = str(info.value)
    assert "bad.jinja" in msg and "line 2" in msg and "\n" not in msg


def test_no_template_is_unavailable(tmp_path):
    d = write_tiny_tokenizer(tmp_path / "mymodel", chat_template=None)
    t = ChatTemplate.load(d)
    assert not t.available and t.source is None
    with pytest.raises(TemplateError) as info:
        t.render([{"role": "user", "content": "hi"}])
    assert str(info.value) == (
        "model mymodel has no chat template; use /v1/completions for plain text or pass --chat-template FILE"
    )
    assert not ChatTemplate.load(tmp_path / "empty_dir_does_not_exist", model_name="x").available


def test_empty_conversation_and_bad_messages(ours):
    with pytest.raises(TemplateError, match="empty conversation"):
        ours["phi3"].render([])
    with pytest.raises(TemplateError, match="messages"):
        ours["phi3"].render(["just a string"])
    with pytest.raises(TemplateError, match="not compatible"):
        render_template(
            PHI3, CONVERSATIONS["ends_with_assistant"], add_generation_prompt=True, continue_final_message=True
        )


def test_message_objects_are_converted_to_plain_data():
    import attrs

    @attrs.define
    class Msg:
        role: str
        content: str

    t = ChatTemplate.from_string("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    assert t.render([Msg("user", "hi"), {"role": "assistant", "content": "yo"}]) == "user:hi;assistant:yo;"


# ------------------------------------------------------------------------ source priority
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_source_priority(tmp_path):
    d = write_tiny_tokenizer(tmp_path / "m", chat_template="from-tokenizer-config")
    conv = [{"role": "user", "content": "x"}]
    assert ChatTemplate.load(d).render(conv) == "from-tokenizer-config"
    _write(d / "chat_template.json", json.dumps({"chat_template": "from-chat-template-json"}))
    assert ChatTemplate.load(d).render(conv) == "from-chat-template-json"
    _write(d / "chat_template.jinja", "from-chat-template-jinja")
    loaded = ChatTemplate.load(d)
    assert loaded.render(conv) == "from-chat-template-jinja" and loaded.source == str(d / "chat_template.jinja")
    c_json = _write(
        tmp_path / "c.json", json.dumps({"chat_template": "from-c-json {{ bos_token }}", "bos_token": "<BOS>"})
    )
    assert ChatTemplate.load(d, chat_template_file=c_json).render(conv) == "from-c-json <BOS>"
    c_jinja = _write(tmp_path / "c.jinja", "from-c-jinja {{ eos_token }}")
    assert ChatTemplate.load(d, chat_template_file=c_jinja).render(conv) == "from-c-jinja </s>"
    j = _write(tmp_path / "j.jinja", "from-j")
    assert ChatTemplate.load(d, chat_template_file=c_jinja, jinja_explicit=j).render(conv) == "from-j"
    # -j alone, without a model directory
    assert ChatTemplate.load(None, jinja_explicit=j).render(conv) == "from-j"


def test_additional_chat_templates_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = write_tiny_tokenizer(tmp_path, chat_template=None)
    _write(d / "chat_template.jinja", PHI3)
    _write(d / "additional_chat_templates" / "tool_use.jinja", QWEN25)
    mine = ChatTemplate.load(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert set(mine.names) == {"default", "tool_use"}
    conv = CONVERSATIONS["multi_turn"]
    assert mine.render(conv, tools=TOOLS) == _hf_render(hf_tok, conv, add_generation_prompt=True, tools=TOOLS)
    assert mine.render(conv) == _hf_render(hf_tok, conv, add_generation_prompt=True)


def test_chat_template_file_errors(tmp_path):
    with pytest.raises(TemplateError, match="not found"):
        ChatTemplate.load(None, chat_template_file=tmp_path / "missing.jinja")
    with pytest.raises(TemplateError, match="not found"):
        ChatTemplate.load(None, jinja_explicit=tmp_path / "missing.jinja")
    bad_json = _write(tmp_path / "bad.json", '{\n "chat_template": \n}')
    with pytest.raises(TemplateError, match=r"bad\.json.*line 3"):
        ChatTemplate.load(None, chat_template_file=bad_json)
    no_key = _write(tmp_path / "nokey.json", '{"bos_token": "<s>"}')
    with pytest.raises(TemplateError, match="chat_template"):
        ChatTemplate.load(None, chat_template_file=no_key)
    bad_list = _write(tmp_path / "badlist.json", '{"chat_template": [{"name": "x"}]}')
    with pytest.raises(TemplateError, match="name"):
        ChatTemplate.load(None, chat_template_file=bad_list)


def test_malformed_tokenizer_config_is_model_load_error(tmp_path):
    _write(tmp_path / "tokenizer_config.json", "{ nope")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        ChatTemplate.load(tmp_path)


def test_special_tokens_and_overrides(ours):
    t = ChatTemplate.from_string("{{ bos_token }}|{{ eos_token }}|{{ custom }}", special_tokens={"bos_token": "<s>"})
    conv = [{"role": "user", "content": "x"}]
    assert t.render(conv, eos_token="</s>", custom=1) == "<s>|</s>|1"
    assert t.render(conv, bos_token="<B>") == "<B>||"
    assert ours["llama31"].special_tokens["bos_token"] == "<|begin_of_text|>"
    assert "tools" in ours["qwen25"].variables() and "enable_thinking" in ours["qwen3"].variables()


def test_default_chatml_helper_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = write_tiny_tokenizer(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    mine = ChatTemplate.load(d)
    assert mine.template == CHATML_TEMPLATE
    for conv in ("system_user", "tool_round_trip", "tool_string_args"):
        for tools in (None, TOOLS):
            _compare(hf_tok, mine, CONVERSATIONS[conv], add_generation_prompt=True, tools=tools)
