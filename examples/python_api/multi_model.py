"""Several models in one process: one Runner per model, each with its own engine, so they
answer in parallel. Here: the demo model (a Llama) and a tiny Qwen3 built on the fly.

    python examples/python_api/multi_model.py [MODEL_A [MODEL_B]]

(`mistralrs from-config` serves several models behind one HTTP server instead: see
examples/from_config/two_models.toml.)
"""

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from make_tiny_model import write_tiny_model

from mistralrs import ChatCompletionRequest, Runner, Which

model_a = sys.argv[1] if len(sys.argv) > 1 else "demo"

with tempfile.TemporaryDirectory() as tmp:
    if len(sys.argv) > 2:
        which_b = Which.Plain(model_id=sys.argv[2])
    else:
        # Only config.json and a tokenizer: dummy_weights fills the weights with random values.
        which_b = Which.Plain(model_id=str(write_tiny_model(f"{tmp}/tiny-qwen3")), dummy_weights=True)

    with Runner(which=Which.Plain(model_id=model_a)) as a, Runner(which=which_b) as b:
        runners = {"a": a, "b": b}
        print("a:", model_a, "| b:", which_b.model_id)

        def ask(job: tuple[str, str]) -> str:
            name, question = job
            res = runners[name].send_chat_completion_request(ChatCompletionRequest(messages=question, max_tokens=16))
            return f"[{name}] {question!r} -> {res.choices[0].finish_reason}: {res.choices[0].message.content!r}"

        # A Runner takes requests from any thread; different models really run side by side.
        jobs = [("a", "Hello!"), ("b", "Hello!"), ("a", "What is a llama?"), ("b", "What is Qwen?")]
        with ThreadPoolExecutor() as pool:
            for line in pool.map(ask, jobs):
                print(line)
