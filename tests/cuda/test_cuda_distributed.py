"""Device mapping and tensor parallelism on CUDA (marker ``cuda``; skipped without GPUs).

- a tiny Llama mapped GPU 0 + CPU (``-n 0:1``: the second layer offloaded, in fp32) gives the
  same greedy tokens as on one GPU in fp32, with one KV pool per device;
- with two GPUs, ``0:1;1:1`` the same; and ``-tp 2`` (NCCL) the same answers as one GPU.
"""

from __future__ import annotations

import pytest
import torch

from mistralrs import device_map as dm
from mistralrs.loading import build_attention_backend, generate_greedy, load_model
from tests.helpers.tiny_models import write_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _greedy(loaded):
    backend = build_attention_backend(loaded, num_blocks=8, block_size=16, device="cuda:0")
    return generate_greedy(loaded, backend, [3, 4, 5, 6, 7], 12), backend


def test_gpu_and_cpu_offload_same_tokens(tmp_path):
    d = write_tiny_llama(tmp_path / "m", layers=2)
    ref, _ = _greedy(load_model(d, dtype="f32", device="cuda:0"))
    plan = dm.plan_from_device_layers(dm.parse_device_layers("0:1", accelerator="cuda"), 2)
    assert plan.float32_groups == {1}
    out, backend = _greedy(load_model(d, dtype="f32", device="cuda:0", device_map=plan))
    assert out == ref
    assert [str(s.shape.device) for s in backend.subs] == ["cuda:0", "cpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_same_tokens(tmp_path):
    d = write_tiny_llama(tmp_path / "m", layers=2)
    ref, _ = _greedy(load_model(d, dtype="f32", device="cuda:0"))
    plan = dm.plan_from_device_layers(dm.parse_device_layers("0:1;1:1", accelerator="cuda"), 2)
    out, _ = _greedy(load_model(d, dtype="f32", device="cuda:0", device_map=plan))
    assert out == ref


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_nccl_same_answer(tmp_path):
    from mistralrs import ChatCompletionRequest, Runner, Which

    d = write_tiny_llama(tmp_path / "m", layers=2)

    def answer(**kw):
        runner = Runner(Which.Plain(model_id=str(d), dtype="f32"), **kw)
        try:
            res = runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0))
            return res.choices[0].message.content
        finally:
            runner.shutdown()

    assert answer(tensor_parallel_size=2) == answer()
