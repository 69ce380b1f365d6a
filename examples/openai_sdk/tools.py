"""Tool calling through the `openai` SDK: the model asks for a function, you run it and send
the result back, the model answers.

    python examples/openai_sdk/tools.py [URL]   # default http://localhost:1234 ($MISTRALRS_URL)
"""

import json
import os
import sys

from openai import OpenAI

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_URL", "http://localhost:1234")
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MISTRALRS_API_KEY", "none"))

tools = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather in a city",
    # The enum keeps even the random demo model's arguments short and valid.
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]}},
                   "required": ["city"]},
}}]


def get_weather(city: str) -> str:
    return f"sunny, 22 C in {city}"


messages = [{"role": "user", "content": "What's the weather in Paris?"}]
# "required" makes the model call a tool (a grammar enforces it); "auto" lets it choose.
res = client.chat.completions.create(model="default", messages=messages, tools=tools,
                                     tool_choice="required", max_tokens=64)
message = res.choices[0].message
print("finish_reason:", res.choices[0].finish_reason)  # "tool_calls"

messages.append(message.model_dump(exclude_none=True))  # the assistant turn with its calls
for call in message.tool_calls:
    result = get_weather(**json.loads(call.function.arguments))  # arguments is a JSON string
    print(f"called {call.function.name}({call.function.arguments}) -> {result!r}")
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})

res = client.chat.completions.create(model="default", messages=messages, tools=tools, max_tokens=32)
print("answer:", res.choices[0].message.content)
