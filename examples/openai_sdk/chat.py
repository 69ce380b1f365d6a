"""Chat through the official `openai` SDK against `mistralrs serve`.

    mistralrs serve -m demo                  # in another terminal (port 1234)
    python examples/openai_sdk/chat.py [URL] # URL or $MISTRALRS_URL, default http://localhost:1234
"""

import os
import sys

from openai import OpenAI

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_URL", "http://localhost:1234")
# Any api_key works unless the server was started with --api-key.
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MISTRALRS_API_KEY", "none"))

# "default" is whichever model the server serves first; the others are listed by their id.
print("models:", [m.id for m in client.models.list()])

res = client.chat.completions.create(
    model="default",
    messages=[{"role": "system", "content": "You are a terse assistant."},
              {"role": "user", "content": "Why is the sky blue?"}],
    max_tokens=32,
    temperature=0.7,
    extra_body={"top_k": 40, "min_p": 0.05},  # mistral.rs sampling extensions go in extra_body
)
print("assistant:", res.choices[0].message.content)
print("finish_reason:", res.choices[0].finish_reason)
print(f"usage: {res.usage.prompt_tokens} prompt + {res.usage.completion_tokens} completion tokens")
