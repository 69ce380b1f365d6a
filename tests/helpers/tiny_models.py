"""Tiny random-weight checkpoints of real architectures, written with transformers (the
reference implementation) so the tests load exactly what users load."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tiny_tokenizer import write_tiny_tokenizer


def write_tiny_llama(directory: Path, *, seed: int = 0, layers: int = 2, max_position_embeddings: int = 512,
                     generation_config: dict | None = None, hidden_size: int = 64, intermediate_size: int = 128,
                     tie_word_embeddings: bool = False) -> Path:
    """A 2-layer Llama (hidden 64 unless given) with a ChatML tokenizer; returns the directory."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mistralrs.tokenization import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(directory)
    vocab = Tokenizer.from_dir(directory).vocab_size
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_position_embeddings,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    if generation_config is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation_config))
    return directory
