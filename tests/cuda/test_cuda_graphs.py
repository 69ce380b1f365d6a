"""Decode CUDA graphs on a GPU (marker ``cuda``; skipped without one, or without Triton, whose decode kernel
the graphs need): real captures and replays give the tokens of eager steps, for concurrent requests of
different lengths (several padded batch sizes) and an fp8 KV cache; each size is captured once."""

from __future__ import annotations

import pytest
import torch

from mistralrs import protocol as P
from mistralrs.engine import decode_graphs
from mistralrs.engine.requests import GenerationRequest
from mistralrs.engine.sampling import SamplingParams
from mistralrs.serving import ModelService, ServiceOptions
from tests.helpers.tiny_models import write_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GREEDY = SamplingParams(temperature=0)
TEXTS = ["The quick brown fox", "hello there", "what is two plus two", "a", "tell me a story", "count to ten"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def run(model_dir, monkeypatch, graphs: bool, **kw):
    monkeypatch.setenv(decode_graphs.ENV, "1" if graphs else "0")
    svc = ModelService(ServiceOptions(model_id=str(model_dir), device="cuda", pa_context_len=2048, pa_blk_size=16,
                                      max_seqs=8, max_seq_len=512, **kw))
    try:
        if graphs and svc.engine.graphs_off:
            pytest.skip(f"decode CUDA graphs are off here: {svc.engine.graphs_off}")
        handles = [svc.engine.submit(GenerationRequest(
            prompt_ids=svc.encode_chat([{"role": "user", "content": t}]), sampling=GREEDY, max_tokens=10 + 3 * i,
            ignore_eos=True)) for i, t in enumerate(TEXTS)]
        tokens = [tuple(P.collect(h)[0].choices[0].token_ids) for h in handles]
        g = svc.engine.runner.graphs
        return tokens, ({size: c.replays for size, c in g.graphs.items()} if g is not None else {})
    finally:
        svc.shutdown()


@pytest.mark.parametrize("dtype,cache", [("f32", "auto"), ("bf16", "auto"), ("bf16", "f8e4m3")])
def test_graph_replays_give_the_eager_tokens(tiny_llama, monkeypatch, dtype, cache):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eager, none = run(tiny_llama, monkeypatch, False, dtype=dtype, pa_cache_type=cache)
        replayed, sizes = run(tiny_llama, monkeypatch, True, dtype=dtype, pa_cache_type=cache)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert not none
    assert len(sizes) >= 2 and all(n > 0 for n in sizes.values())  # several sizes, each replayed
    if dtype == "f32":
        assert replayed == eager
    else:  # padded batches may take other GEMM tiles in bf16: the same tokens but for rare near-ties
        same = sum(a == b for r, e in zip(replayed, eager) for a, b in zip(r, e))
        assert same >= 0.9 * sum(len(e) for e in eager)
