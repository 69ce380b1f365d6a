"""The packaged offline demo model: `-m demo`.

A small Llama-architecture model (4 layers, hidden 256) whose config, tokenizer and ChatML
chat template ship with mistralrs. Its weights are random (built from config.json alone), so
it needs no network and no download — and its answers are random text. It exists to try the
server, the CLI and the Python API end to end before fetching a real model.
"""

from __future__ import annotations

from pathlib import Path


def demo_model_dir() -> Path:
    return Path(__file__).resolve().parent / "model"
