"""Use the plugin end to end once it is installed (`pip install -e examples/mistralrs-example-plugin`):
write a tiny `parallel_llama` checkpoint, load it through the plugin's architecture, generate,
and let the model call the plugin's `convert_units` tool.

    python examples/mistralrs-example-plugin/demo.py [DIR]      # DIR keeps the checkpoint
    mistralrs serve -m DIR --dummy-weights --enable-tool-sources units
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs.demo import demo_model_dir

CONFIG = {
    "architectures": ["ParallelLlamaForCausalLM"],  # selects the plugin's ArchitectureSpec
    "model_type": "parallel_llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": [1, 4],
}


def write_checkpoint(directory: str) -> Path:
    """config.json plus the demo model's tokenizer and ChatML template; no weights (see below)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / name, path / name)
    vocab_size = json.loads((demo_model_dir() / "config.json").read_text())["vocab_size"]
    (path / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": vocab_size}, indent=2))
    return path


with tempfile.TemporaryDirectory() as tmp:
    model_dir = write_checkpoint(sys.argv[1] if len(sys.argv) > 1 else tmp)
    # dummy_weights: random weights from config.json alone, so the answers are random text.
    # enable_tool_sources: offer the `units` source's tools to the model and run them here.
    which = Which.Plain(model_id=str(model_dir), dummy_weights=True)
    with Runner(which=which, enable_tool_sources=["units"]) as runner:
        res = runner.send_chat_completion_request(ChatCompletionRequest(messages="Hello!", max_tokens=16))
        print(f"parallel_llama generated ({res.choices[0].finish_reason}): {res.choices[0].message.content!r}")

        # "required" forces a tool call, so even random weights call convert_units. max_tokens
        # covers the whole call (random weights write numbers with many decimals) and, again,
        # the answer after it.
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages="How many miles is 5 km?", tool_choice="required", max_tokens=200))
        for call in res.agentic_tool_calls or []:
            print(f"the model called {call.name}({call.arguments}) -> {call.result_content!r}")
