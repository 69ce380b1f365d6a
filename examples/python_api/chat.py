"""Chat with a model in-process: load it once, send a conversation, read the answer and usage.

    python examples/python_api/chat.py [MODEL]

MODEL (or $MISTRALRS_MODEL) is a Hugging Face id, a local directory, or `demo` (the default:
the packaged offline model with random weights, so its answers are random text).
"""

import os
import sys

from mistralrs import ChatCompletionRequest, Runner, Which

model_id = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_MODEL", "demo")

# The Runner loads the model and starts the engine thread; leaving `with` shuts it down.
with Runner(which=Which.Plain(model_id=model_id)) as runner:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, max_tokens=32, temperature=0.7))
    answer = res.choices[0]
    print("assistant:", answer.message.content)
    # "length": max_tokens cut the answer short; "stop": the model ended it.
    print("finish_reason:", answer.finish_reason)
    print(f"usage: {res.usage.prompt_tokens} prompt + {res.usage.completion_tokens} completion tokens")

    # The model is stateless: a follow-up turn resends the whole conversation. The shared
    # prefix is served from the prefix cache (cached_tokens) instead of being recomputed.
    messages += [{"role": "assistant", "content": answer.message.content},
                 {"role": "user", "content": "Say it in five words."}]
    res = runner.send_chat_completion_request(ChatCompletionRequest(messages=messages, max_tokens=16))
    print("assistant:", res.choices[0].message.content)
    print("finish_reason:", res.choices[0].finish_reason)
    print("cached prompt tokens:", res.usage.prompt_tokens_details["cached_tokens"])
