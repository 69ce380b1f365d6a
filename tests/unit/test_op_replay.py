"""The CPU op recorder and replay (`engine.op_replay`): a replay runs the recorded ops on the constants'
current values (static inputs updated in place, in-place writes kept), and every kind of host decision
refuses the capture instead of being baked in."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mistralrs.engine.op_replay import CpuGraph, HostDecision, record, same_step, straight_line, to_graph


def captured(fn):
    graph = CpuGraph()
    assert graph.capture(fn, fn) is None
    return graph


def test_replay_reads_the_inputs_as_they_are_and_writes_in_place():
    x = torch.randn(3, 8)
    w = torch.randn(8, 4)
    cache = torch.zeros(5, 4)
    slot = torch.tensor([0])

    def step():
        y = torch.relu(x @ w)
        a, b = y.split([1, 2])
        cache.index_copy_(0, slot, a)
        return (b * 2).sum(0) + cache.sum(0)

    graph = captured(step)
    for i in range(4):
        with torch.inference_mode():  # as the engine replays
            x.copy_(torch.randn(3, 8))
            slot.fill_(i + 1)
            before = cache.clone()
            got = graph.replay()
            y = torch.relu(x @ w)
            before[i + 1] = y[0]
        torch.testing.assert_close(cache, before)
        torch.testing.assert_close(got, (y[1:] * 2).sum(0) + before.sum(0))


def test_the_graph_is_straight_line_calls_of_the_recorded_ops():
    x = torch.randn(4)
    ops, out = record(lambda: torch.nn.functional.silu(x) * 3)
    module = to_graph(ops, out)
    calls = [n.target for n in module.graph.nodes if n.op == "call_function"]
    assert calls == [op.func for op in ops] and len(calls) == 2
    assert module.c0 is x  # constants by reference, not copies


def test_straight_line_calls_the_ops_entry_points_with_every_kind_of_argument():
    x = torch.randn(3, 8)
    w = torch.randn(8, 4)

    def step():  # kwargs, dtypes, lists, tuple results (getitem), a float scalar
        a, b = torch.split(x @ w, [1, 2])
        y = torch.cat([a, b * 0.5], dim=0).to(torch.bfloat16).float()
        return torch.softmax(y, dim=-1, dtype=torch.float32)

    ops, out = record(step)
    module = to_graph(ops, out)
    run = straight_line(module)
    with torch.inference_mode():
        torch.testing.assert_close(run(), step(), rtol=0, atol=0)
        torch.testing.assert_close(module(), step(), rtol=0, atol=0)
    bound = {v for k, v in run.func.__globals__.items() if k.startswith("_op")}
    assert bound == {op.func._op for op in ops if hasattr(op.func, "_op")} and len(bound) >= 4


@pytest.mark.parametrize("step, what", [
    (lambda x: x + x.sum().item(), "reads a tensor on the host"),
    (lambda x: x * 2 if bool(x.sum() > 0) else x, "takes a branch|reads a tensor on the host"),
    (lambda x: x + len(x.tolist()), ".tolist()"),
    (lambda x: x + torch.tensor([1.0, 2.0, 3.0]), "torch.tensor"),
    (lambda x: x[x > 0].sum(), "boolean mask"),
    (lambda x: x.index_select(0, torch.nonzero(x > 0).flatten()), "sizes its work"),
    (lambda x: torch.unique(x), "sizes its work"),
])
def test_host_decisions_refuse_the_capture(step, what):
    x = torch.randn(3)
    with pytest.raises(HostDecision, match=what):
        CpuGraph().capture(lambda: step(x), lambda: None)


def test_tensors_made_outside_the_dispatcher_refuse_the_capture():
    x = torch.randn(3)
    count = iter(range(100))

    def step():  # a new tensor each step on a host buffer: a replay would keep the first one
        return x + torch.frombuffer(bytearray(np.full(3, float(next(count)), dtype=np.float32)), dtype=torch.float32)

    with pytest.raises(HostDecision, match="made on the host"):
        CpuGraph().capture(step, lambda: None)
    first, _ = record(lambda: x * 2)
    again, _ = record(lambda: x + 2)
    assert "was aten.mul.Tensor once and aten.add.Tensor" in same_step(first, again)


def test_recording_does_not_import_dynamo():
    """torch would wrap a dispatch mode in torch._dynamo.disable, whose first call imports torch._dynamo
    (1.5-2 s at every load): the recorder opts out."""
    code = ("import sys, torch\nfrom mistralrs.engine.op_replay import record\n"
            "ops, y = record(lambda: torch.ones(3) * 2)\n"
            "assert ops and float(y.sum()) == 6.0\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
