"""Stream an answer token by token, then read the finish reason and usage.

    python examples/python_api/streaming.py [MODEL]      # default: demo (random text)
"""

import os
import sys

from mistralrs import ChatCompletionRequest, Runner, Which

model_id = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_MODEL", "demo")

with Runner(which=Which.Plain(model_id=model_id)) as runner:
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="Tell me a short story.", max_tokens=48, stream=True))
    finish_reason = usage = None
    for chunk in stream:
        # The last chunk has no choices, only the usage of the whole request.
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
            finish_reason = choice.finish_reason or finish_reason
    print()
    print("finish_reason:", finish_reason)
    print(f"usage: {usage.completion_tokens} tokens at {usage.avg_compl_tok_per_sec:.1f} tok/s")
