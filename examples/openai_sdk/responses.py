"""The Responses API through the `openai` SDK: stored responses, chaining with
previous_response_id, streaming events.

    python examples/openai_sdk/responses.py [URL]   # default http://localhost:1234 ($MISTRALRS_URL)
"""

import os
import sys

from openai import OpenAI

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_URL", "http://localhost:1234")
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MISTRALRS_API_KEY", "none"))

first = client.responses.create(model="default", input="My name is Ada.", instructions="Be brief.",
                                max_output_tokens=16)
# "incomplete" (incomplete_details.reason "max_output_tokens") when the limit cut it short.
print(f"{first.id} [{first.status}]:", first.output_text)

# The server keeps the conversation: chain on the stored response instead of resending it.
second = client.responses.create(model="default", input="What is my name?", previous_response_id=first.id,
                                 max_output_tokens=16)
print(f"{second.id} [{second.status}]:", second.output_text)

# Streaming sends named events: the text in response.output_text.delta, and the whole response
# in the last one (response.completed, or response.incomplete when max_output_tokens hit).
final = None
for event in client.responses.create(model="default", input="Count to five.", max_output_tokens=16, stream=True):
    if event.type == "response.output_text.delta":
        print(event.delta, end="", flush=True)
    elif event.type in ("response.completed", "response.incomplete"):
        final = event.response
print(f"\n{final.id} [{final.status}]: {final.usage.output_tokens} output tokens")

for response in (first, second, final):
    client.responses.delete(response.id)
