"""Re-ISQ (`requantize`, `Runner.send_re_isq`, `POST /re_isq`): a loaded model re-quantized in
place between engine steps, with requests in flight."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.helpers.parity import our_logits
from tests.helpers.tiny_models import write_tiny_llama

IDS = torch.tensor([3, 17, 5, 42, 8, 9, 60, 2])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("reisq") / "llama", hidden_size=256, intermediate_size=512,
                            tie_word_embeddings=True)


def _load(path, isq=None):
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan

    plan = IsqPlan(isq) if isq else None
    return load_model(path, dtype=torch.float32, quant_method_for=plan.method_for if plan else None)


def test_a_float_model_requantized_equals_its_isq_load(llama):
    from mistralrs.nn.linear import describe_methods
    from mistralrs.quantization import IsqPlan
    from mistralrs.requantize import requantize

    loaded = _load(llama)
    counts = requantize(loaded.model, IsqPlan("q8_0"))
    assert counts == {"q8_0": 15} and describe_methods(loaded.model) == {"q8_0": 15}
    attn = loaded.model.model.layers[0].self_attn
    assert attn._qkv is not None  # q/k/v fused again
    assert torch.equal(our_logits(loaded, IDS), our_logits(_load(llama, "q8_0"), IDS))


def test_a_quantized_model_requantizes_from_its_dequantized_weights(llama):
    from mistralrs.quantization import IsqPlan
    from mistralrs.requantize import requantize

    loaded = _load(llama, "q8_0")
    layer = loaded.model.model.layers[1].mlp.down_proj
    want = layer.quant_method.dequantize(layer)
    requantize(loaded.model, IsqPlan("q4k"))
    assert layer.quant_method.qtype == "q4k"
    from mistralrs_plugins.quant.ggml.formats import quantize

    assert torch.equal(layer.qweight, quantize("q4k", want))
    head = loaded.model.model.embed_tokens.quantized_head
    assert head.quant_method.qtype == "q6k"  # the tied head: the sensitive-tensor type of q4k
    gate_up = loaded.model.model.layers[0].mlp._gate_up_q
    assert gate_up is not None and gate_up.quant_method.qtype == "q4k"  # gate/up fused again
    assert torch.isfinite(our_logits(loaded, IDS)).all()


def test_runner_re_isq_between_steps_keeps_requests_going(llama):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from mistralrs.errors import ConfigError
    from mistralrs.nn.linear import describe_methods

    runner = Runner(Which.Plain(model_id=str(llama), dtype="f32"))
    reference = Runner(Which.Plain(model_id=str(llama), dtype="f32"), in_situ_quant="q8_0")
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=24, temperature=0.0)
    try:
        stream = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "a long one"}], max_tokens=40, temperature=0.0, stream=True))
        first = next(stream)  # generation has started
        done = threading.Event()
        counts = {}

        def requant():
            counts.update(runner.send_re_isq("Q8_0"))
            done.set()

        t = threading.Thread(target=requant)
        t.start()
        chunks = [first, *stream]  # the in-flight request finishes
        t.join(60)
        assert done.is_set() and counts == {"q8_0": 15}
        assert chunks[-1].usage.completion_tokens == 40
        assert describe_methods(runner.service.loaded.model) == {"q8_0": 15}
        got = runner.send_chat_completion_request(request).choices[0].message.content
        want = reference.send_chat_completion_request(request).choices[0].message.content
        assert got == want
        with pytest.raises(ConfigError, match="ggml_type 'q9x' is not a quantization type"):
            runner.send_re_isq("q9x")
    finally:
        runner.shutdown()
        reference.shutdown()


def test_http_re_isq(llama):
    from mistralrs import Runner, Which
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    runner = Runner(Which.Plain(model_id=str(llama), dtype="f32"))
    srv = start_server(runner.service)
    try:
        status, _, body = http(srv.url + "/re_isq", {"ggml_type": "Q4K"})
        assert status == 200 and body.decode() == 'Re ISQ: "Q4K"'
        assert runner.service.loaded.model.model.layers[0].mlp.up_proj.quant_method.qtype == "q4k"
        status, _, body = http(srv.url + "/re_isq", {"ggml_type": "Q9K"})
        assert status == 400 and b"is not a quantization type" in body
        status, _, body = http(srv.url + "/re_isq", {})
        assert status == 400 and b"ggml_type" in body
        status, _, body = http(srv.url + "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert status == 200
    finally:
        srv.stop()
        runner.shutdown()
