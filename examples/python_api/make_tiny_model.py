"""Write a tiny Qwen3-architecture checkpoint directory, offline, in well under a second.

    python examples/python_api/make_tiny_model.py ./tiny-qwen3
    mistralrs run -m ./tiny-qwen3 --dummy-weights -i "Hello"

Only config.json and the tokenizer are written: load it with dummy weights
(`--dummy-weights`, `Which.Plain(..., dummy_weights=True)`, `dummy_weights = true` in TOML),
which fills deterministic random values. Like the `demo` model it answers random text; it
exists to try a second architecture (and several models at once) without a download.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mistralrs.demo import demo_model_dir

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],  # picks the architecture plugin
    "model_type": "qwen3",  # picks the default tool-call (hermes) and reasoning (think) parsers
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": [1, 4],
}


def write_tiny_model(directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    demo = demo_model_dir()
    # Reuse the demo model's tokenizer (and its ChatML chat template) so nothing is downloaded.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, directory / name)
    vocab_size = json.loads((demo / "config.json").read_text())["vocab_size"]
    (directory / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": vocab_size}, indent=2))
    return directory


if __name__ == "__main__":
    print(write_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen3"))
