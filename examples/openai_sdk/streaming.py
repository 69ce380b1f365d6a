"""Stream a chat completion through the `openai` SDK (server-sent events).

    python examples/openai_sdk/streaming.py [URL]   # default http://localhost:1234 ($MISTRALRS_URL)
"""

import os
import sys

from openai import OpenAI

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_URL", "http://localhost:1234")
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MISTRALRS_API_KEY", "none"))

stream = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Tell me a short story."}],
    max_tokens=48,
    stream=True,
    stream_options={"include_usage": True},  # adds a last chunk with no choices, only usage
)
for chunk in stream:
    if chunk.usage:
        print(f"\nusage: {chunk.usage.completion_tokens} completion tokens")
    for choice in chunk.choices:
        print(choice.delta.content or "", end="", flush=True)
        if choice.finish_reason:
            print("\nfinish_reason:", choice.finish_reason)
