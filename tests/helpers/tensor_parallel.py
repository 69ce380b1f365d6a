"""Tensor-parallel checks in real processes: every rank loads the same tiny models split over a
gloo world and runs a prefill and a greedy decode; rank 0 saves what it saw."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from pathlib import Path
from typing import Any

PROMPT = [3, 4, 5, 6, 7, 8, 9, 10]
NEW_TOKENS = 10


def write_tiny_models(root: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (directory, isq): dense (MHA, tied embeddings: the vocab-parallel table is the head),
    GQA, MQA (one KV head: replicated on every rank), MoE (Mixtral) and the GQA model quantized
    with ISQ q8_0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from mistralrs.tokenization import Tokenizer
    from tests.helpers.tiny_models import write_tiny_llama
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    out: dict[str, tuple[Path, str | None]] = {}
    gqa = write_tiny_llama(root / "gqa", layers=2, seed=3)
    vocab = Tokenizer.from_dir(gqa).vocab_size
    out["gqa"] = (gqa, None)
    out["q8_0"] = (gqa, "q8_0")
    for name, cls, config in (
        ("dense", LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                                                max_position_embeddings=256, tie_word_embeddings=True)),
        ("mqa", LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, vocab_size=vocab,
                                              max_position_embeddings=256)),
        ("moe", MixtralForCausalLM, MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                                  num_local_experts=4, num_experts_per_tok=2,
                                                  max_position_embeddings=256)),
    ):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        write_tiny_tokenizer(d)
        torch.manual_seed(1)
        cls(config).save_pretrained(d)
        out[name] = (d, None)
    return out


def run_model(model_dir: Path, isq: str | None, tensor_parallel: Any = None) -> tuple[Any, list[int], dict]:
    """(prefill logits [T, V], greedy tokens, linear methods) of one model, split when
    `tensor_parallel` is given."""
    import torch

    from mistralrs.loading import build_attention_backend, generate_greedy, load_model
    from mistralrs.plugins import get_registry

    method_for = None
    if isq:
        from mistralrs.quantization import IsqPlan

        method_for = IsqPlan(isq, device_type="cpu", registry=get_registry()).method_for
    loaded = load_model(model_dir, dtype="f32", quant_method_for=method_for, tensor_parallel=tensor_parallel)
    backend = build_attention_backend(loaded, num_blocks=4, block_size=32)
    with torch.inference_mode():
        ids = torch.tensor(PROMPT)
        hidden = loaded.model(ids, torch.arange(len(PROMPT)), backend.batch([0, len(PROMPT)], [len(PROMPT)]))
        logits = loaded.model.compute_logits(hidden)
    tokens = generate_greedy(loaded, backend, PROMPT, NEW_TOKENS)
    from mistralrs.nn.linear import describe_methods

    return logits, tokens, describe_methods(loaded.model)


def _rank_main(rank: int, size: int, port: int, models: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from mistralrs.distributed.sharding import TensorParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        results = {}
        for name, (d, isq) in models.items():
            logits, tokens, methods = run_model(d, isq, TensorParallel(rank, size))
            results[name] = (logits, tokens, methods)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run_split(models: dict, size: int, out: Path, timeout: float = 180) -> dict:
    """Run `models` split over `size` local processes; rank 0's results."""
    import torch

    from mistralrs.distributed.world import free_port

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, models, str(out))) for r in range(size)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
        codes = [p.exitcode for p in procs]
        assert codes == [0] * size, f"rank exit codes {codes}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return torch.load(out)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(x) for x in f.read().split())
    return out
