"""Use the Runner from asyncio: concurrent requests are batched together by the engine.

    python examples/python_api/async_chat.py [MODEL]     # default: demo (random text)
"""

import asyncio
import os
import sys

from mistralrs import ChatCompletionRequest, Runner, Which

model_id = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MISTRALRS_MODEL", "demo")


async def ask(runner: Runner, question: str) -> str:
    res = await runner.send_chat_completion_request_async(ChatCompletionRequest(
        messages=question, max_tokens=24))
    return f"{question!r} -> {res.choices[0].finish_reason}: {res.choices[0].message.content!r}"


async def main(runner: Runner) -> None:
    questions = ["What is 2 + 2?", "Name a colour.", "Say hello in French."]
    for line in await asyncio.gather(*(ask(runner, q) for q in questions)):
        print(line)

    # With stream=True the awaited result is an async iterator of chunks.
    stream = await runner.send_chat_completion_request_async(ChatCompletionRequest(
        messages="Count to five.", max_tokens=16, stream=True))
    async for chunk in stream:
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
            if choice.finish_reason:
                print("\nfinish_reason:", choice.finish_reason)


# Loading is synchronous (it takes seconds): create the Runner before the event loop starts.
with Runner(which=Which.Plain(model_id=model_id)) as runner:
    asyncio.run(main(runner))
