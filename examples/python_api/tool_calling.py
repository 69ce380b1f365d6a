"""Tool calling, two ways: a Python callback the engine runs for you (the tool loop), and a
call handed back to you to run and answer.

    python examples/python_api/tool_calling.py [MODEL]   # default: demo (random text)
"""

import json
import os
import sys

from mistralrs import ChatCompletionRequest, Runner, Which

model_id = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_MODEL", "demo")

# The enums keep even a random-weight model's arguments short and valid.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "JST"]}},
                   "required": ["tz"]}}}


def get_weather(name: str, arguments: dict) -> str:
    return f"sunny, 22 C in {arguments['city']}"


with Runner(which=Which.Plain(model_id=model_id), tool_callbacks={"get_weather": get_weather}) as runner:
    # 1. A tool with a callback runs inside the engine; generation then goes on with its result.
    #    "required" forces a call (a grammar enforces it); real models usually do fine with "auto".
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="What's the weather in Paris?", tools=[WEATHER], tool_choice="required", max_tokens=64))
    for call in res.agentic_tool_calls or []:
        print(f"engine ran {call.name}({call.arguments}) -> {call.result_content!r}")
    print("answer:", res.choices[0].message.content)

    # 2. A tool without a callback comes back in message.tool_calls: run it, send the result.
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, tools=[TIME], tool_choice="required", max_tokens=64))
    print("finish_reason:", res.choices[0].finish_reason)  # "tool_calls"
    call = res.choices[0].message.tool_calls[0]
    tz = json.loads(call.function.arguments)["tz"]  # arguments is a JSON string
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": f"12:00 {tz}"},
    ]
    res = runner.send_chat_completion_request(ChatCompletionRequest(messages=messages, tools=[TIME], max_tokens=32))
    print(f"called {call.function.name}(tz={tz}); answer:", res.choices[0].message.content)
