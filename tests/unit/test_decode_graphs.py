"""Decode graphs (`engine.decode_graphs`): when they are on and why not; the capture/replay plan
(eligible steps, padding into a block kept out of the pool, one capture per padded batch size, replays on
static buffers) run through the engine on the CPU with a stand-in graph that captures by running the step
and replays by running it again into the captured output (the CUDA plan); and the real CPU graphs
(`engine.op_replay`) against eager steps. The stand-in re-runs Python, so it cannot catch a host value
baked into a real CUDA graph: tests/cuda does that on a GPU."""

from __future__ import annotations

import pytest
import torch

from mistralrs import protocol as P
from mistralrs.attention import KVCacheShape
from mistralrs.engine import decode_graphs
from mistralrs.engine.requests import GenerationRequest
from mistralrs.engine.sampling import SamplingParams
from mistralrs.nn.rotary import GraphUnsafeRope, RotaryEmbedding, static_positions
from mistralrs.serving import ModelService, ServiceOptions
from tests.helpers.tiny_models import write_tiny_llama

GREEDY = SamplingParams(temperature=0)


class FakeGraph:
    captures = 0

    def __init__(self, pool=None):
        self.fn = self.out = None

    def capture(self, fn, warmup):
        warmup()
        FakeGraph.captures += 1
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


class FailingGraph(FakeGraph):
    def capture(self, fn, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_env_and_batch_sizes(monkeypatch):
    monkeypatch.delenv(decode_graphs.ENV, raising=False)
    assert decode_graphs.graphs_enabled()  # on by default, as in mistral.rs
    for off in ("0", "false", "No", "off"):
        monkeypatch.setenv(decode_graphs.ENV, off)
        assert not decode_graphs.graphs_enabled()
    monkeypatch.setenv(decode_graphs.ENV, "1")
    assert decode_graphs.graphs_enabled()
    assert decode_graphs.batch_sizes(1) == [1]
    assert decode_graphs.batch_sizes(5) == [1, 2, 4, 5]
    assert decode_graphs.batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert decode_graphs.batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert decode_graphs.batch_sizes(5, "cpu") == [1, 2, 3, 4, 5]  # a padding row costs real work on a CPU
    monkeypatch.setenv(decode_graphs.CPU_ENV, "off")
    assert not decode_graphs.graphs_enabled(decode_graphs.CPU_ENV) and decode_graphs.graphs_enabled()


def backend(name, **kw):
    from mistralrs_plugins.attention.paged.backend import PagedBackend
    from mistralrs_plugins.attention.sdpa.backend import SdpaBackend

    shape = KVCacheShape(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4, block_size=8, dtype=torch.float32,
                         **kw)
    return (PagedBackend if name == "paged" else SdpaBackend)(shape)


def test_why_not(monkeypatch):
    from mistralrs.nn import kernels

    monkeypatch.delenv(decode_graphs.ENV, raising=False)
    monkeypatch.delenv(decode_graphs.CPU_ENV, raising=False)
    paged = backend("paged")
    assert decode_graphs.why_not(paged, "mps") == "decode graphs run on cuda and cpu only"
    assert "reference" in decode_graphs.why_not(paged, "cuda")  # no Triton here: the reference decode syncs
    monkeypatch.setattr(kernels, "lookup_accelerated", lambda op, device, registry=None: None)
    assert "reference" in decode_graphs.why_not(paged, "cpu")  # no native kernel: it reads the lengths on the host
    monkeypatch.setattr(kernels, "lookup_accelerated", lambda op, device, registry=None: object())
    assert decode_graphs.why_not(paged, "cuda:0") is None and decode_graphs.why_not(paged, "cpu") is None
    assert "reads host values" in decode_graphs.why_not(backend("sdpa"), "cuda")
    assert "reads host values" in decode_graphs.why_not(backend("sdpa"), "cpu")
    monkeypatch.setenv(decode_graphs.ENV, "0")
    assert decode_graphs.why_not(paged, "cuda") == f"{decode_graphs.ENV}=0"
    assert decode_graphs.why_not(paged, "cpu") is None
    monkeypatch.setenv(decode_graphs.CPU_ENV, "0")
    assert decode_graphs.why_not(paged, "cpu") == f"{decode_graphs.CPU_ENV}=0"


def test_rotary_static_positions():
    rope = RotaryEmbedding(16, max_position_embeddings=64)
    pos = torch.tensor([3, 40, 0])
    want = rope.cos_sin(pos)
    with static_positions(64):
        got = rope.cos_sin(pos)  # a new epoch: computed again, not the answer from outside
        assert got[0] is not want[0]
        torch.testing.assert_close(got, want)
        assert rope.cos_sin(pos)[0] is got[0]  # within it, the layers share one answer
    dynamic = RotaryEmbedding(16, max_position_embeddings=64,
                              params={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with static_positions(64), pytest.raises(GraphUnsafeRope, match="dynamic"):
        dynamic.cos_sin(pos)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def service(model_dir, **kw) -> ModelService:
    return ModelService(ServiceOptions(model_id=str(model_dir), dtype="f32", pa_context_len=512, pa_blk_size=8,
                                       max_seqs=6, max_seq_len=256, **kw))


def generate(svc, texts, max_tokens=7):
    handles = [svc.engine.submit(GenerationRequest(prompt_ids=svc.encode_chat([{"role": "user", "content": t}]),
                                                   sampling=GREEDY, max_tokens=max_tokens + i, ignore_eos=True))
               for i, t in enumerate(texts)]
    return [tuple(P.collect(h)[0].choices[0].token_ids) for h in handles]


TEXTS = ["The quick brown fox", "hello there", "what is two plus two", "a", "tell me a story"]


@pytest.fixture(scope="module")
def eager(model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(decode_graphs.CPU_ENV, "0")
        svc = service(model_dir)
    try:
        assert svc.engine.runner.graphs is None and svc.engine.graphs_off == f"{decode_graphs.CPU_ENV}=0"
        return generate(svc, TEXTS), generate(svc, TEXTS[:1])
    finally:
        svc.shutdown()


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """The CUDA plan (padded sizes, the CUDA graph's static output) with the stand-in graph, on the CPU."""
    monkeypatch.setattr(decode_graphs, "why_not", lambda backend, device, registry=None: None)
    monkeypatch.setattr(decode_graphs, "batch_sizes", lambda max_seqs, device_type="cuda": _cuda_sizes(max_seqs))
    monkeypatch.setattr(decode_graphs, "pads", lambda device: True)
    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_cpu_graph", staticmethod(FakeGraph))
    FakeGraph.captures = 0


_cuda_sizes = decode_graphs.batch_sizes


def check_replays(engine, monkeypatch) -> list[int]:
    """Every replayed step's logits are checked against the eager forward's on the same inputs; the returned
    list gets each checked step's batch size."""
    graphs, execute, checked = engine.runner.graphs, type(engine.runner).execute, []

    def run(inputs, _run=graphs.run):
        got = _run(inputs)
        if got is not None:
            engine.runner.graphs = None
            try:
                want = execute(engine.runner, inputs)  # writes the same K/V into the same slots again
            finally:
                engine.runner.graphs = graphs
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
            assert got[1] == want[1]
            checked.append(len(inputs.seq_lens))
        return got

    monkeypatch.setattr(graphs, "run", run)
    return checked


def test_decode_steps_replay_graphs_per_padded_size(model_dir, eager, graphs_on_cpu, monkeypatch):
    svc = service(model_dir)
    try:
        engine, be = svc.engine, svc.backend
        graphs = engine.runner.graphs
        assert graphs is not None and engine.graphs_off is None
        assert engine.scheduler.pool.num_blocks == be.num_blocks - 1 and graphs.pad_block == be.num_blocks - 1
        assert graphs.width == 256 // 8 and graphs.sizes == [1, 2, 4, 6]
        checked = check_replays(engine, monkeypatch)
        pad = be.k_cache[0][graphs.pad_block * 8:].clone()
        assert (generate(svc, TEXTS), generate(svc, TEXTS[:1])) == eager
        assert checked and max(checked) == len(TEXTS)
        assert sorted(graphs.graphs) == sorted({graphs.padded_size(n) for n in checked})
        assert FakeGraph.captures == len(graphs.graphs)  # once per size, replays after
        assert sum(c.replays for c in graphs.graphs.values()) == len(checked)
        assert not torch.equal(be.k_cache[0][graphs.pad_block * 8:], pad)  # padding rows wrote their own block
        engine.call_between_steps(lambda: None).result()  # e.g. re-quantization: the graphs go, captured anew
        assert not graphs.graphs
        assert generate(svc, TEXTS[:1]) == eager[1] and graphs.graphs
    finally:
        svc.shutdown()


def test_prefill_and_other_steps_run_eagerly(model_dir, graphs_on_cpu):
    svc = service(model_dir)
    try:
        graphs = svc.engine.runner.graphs
        from mistralrs.engine.runner import StepInputs

        def step(**kw):
            base = dict(ids=torch.tensor([5, 6]), positions=torch.tensor([3, 9]), query_start_loc=[0, 1, 2],
                        seq_lens=[4, 10], sample_rows=[0, 1], sampling=[0, 1], slot_mapping=torch.tensor([3, 17]),
                        block_tables=torch.tensor([[0, 0], [1, 2]]))
            return StepInputs(**{**base, **kw})

        assert graphs.takes(step())
        assert not graphs.takes(step(ids=torch.tensor([5, 6, 7]), query_start_loc=[0, 2, 3]))  # a prefill chunk
        assert not graphs.takes(step(sample_rows=[1], sampling=[1]))
        assert not graphs.takes(step(rope={0: torch.zeros(3, 1, dtype=torch.long)}))
        assert not graphs.takes(step(block_tables=torch.zeros(2, graphs.width + 1, dtype=torch.long)))
        assert not graphs.takes(step(seq_lens=[4, 257]))
        assert not graphs.takes(step(ids=torch.arange(7), positions=torch.arange(7), query_start_loc=list(range(8)),
                                     seq_lens=[1] * 7, sample_rows=list(range(7)), sampling=list(range(7)),
                                     slot_mapping=torch.arange(7), block_tables=torch.zeros(7, 1, dtype=torch.long)))
    finally:
        svc.shutdown()


def test_a_failed_capture_turns_graphs_off_and_steps_run_eagerly(model_dir, eager, graphs_on_cpu, monkeypatch):
    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_cpu_graph", staticmethod(FailingGraph))
    svc = service(model_dir)
    try:
        assert generate(svc, TEXTS[:1]) == eager[1]
        graphs = svc.engine.runner.graphs
        assert graphs.disabled.startswith("capturing a decode step of 1 failed (RuntimeError: operation not permitted")
        assert not graphs.graphs
    finally:
        svc.shutdown()


def test_cpu_graphs_replay_decode_steps_as_eager_ones(model_dir, eager, monkeypatch):
    """The real CPU graphs (on by default here): recorded ops replayed, every size captured once, each
    replay's logits the eager step's, and the same greedy tokens as eager steps for requests of different
    lengths joining and leaving the batch (positions, slots and lengths are never baked in)."""
    from mistralrs.engine.op_replay import CpuGraph
    from mistralrs.nn.kernels import lookup_accelerated

    if lookup_accelerated("paged_attention_decode", "cpu") is None:
        pytest.skip("no native CPU decode attention here: CPU graphs are off")
    monkeypatch.delenv(decode_graphs.CPU_ENV, raising=False)
    svc = service(model_dir)
    try:
        engine = svc.engine
        graphs = engine.runner.graphs
        assert engine.graphs_off is None and graphs.sizes == [1, 2, 3, 4, 5, 6]
        assert graphs.pad_block is None and engine.scheduler.pool.num_blocks == svc.backend.num_blocks  # no padding
        checked = check_replays(engine, monkeypatch)
        assert (generate(svc, TEXTS), generate(svc, TEXTS[:1])) == eager
        assert graphs.disabled is None and sorted(graphs.graphs) == sorted(set(checked))
        assert all(isinstance(c.graph, CpuGraph) for c in graphs.graphs.values())
        assert sum(c.replays for c in graphs.graphs.values()) == len(checked) > len(graphs.graphs)
    finally:
        svc.shutdown()
