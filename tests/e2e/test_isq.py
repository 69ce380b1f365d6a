"""In-situ quantization end to end: `--isq` through the CLI (run, serve), the Python API
(`Runner(in_situ_quant=...)`), from-config and `--topology`, on a tiny Llama whose widths (256,
512) every GGML type can take."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("isq") / "llama256", hidden_size=256, intermediate_size=512,
                            tie_word_embeddings=True)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _methods(model):
    from mistralrs.nn.linear import describe_methods

    return describe_methods(model)


def test_runner_in_situ_quant_q4k(model_dir):
    from mistralrs import ChatCompletionRequest, Runner, Which

    runner = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), in_situ_quant="Q4K")
    try:
        model = runner.service.loaded.model
        methods = _methods(model)
        assert methods == {"q4k": 2 * 7, "q6k": 1}, methods  # q, k, v, o, gate, up, down per layer; the head
        head = model.model.embed_tokens.quantized_head
        assert head is not None and head.quant_method.qtype == "q6k"  # tied head: sensitive -> q6k
        assert model.model.embed_tokens.weight is None  # no float copy of the table is kept
        assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())
        out = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.0))
        assert out.usage.completion_tokens >= 1
    finally:
        runner.service.shutdown()


def test_cli_run_with_isq_and_topology(model_dir, tmp_path):
    topo = tmp_path / "topology.yml"
    topo.write_text("0-1:\n  isq: q8_0\n'/down_proj/':\n  isq: q6k\n")
    out = subprocess.run(
        [sys.executable, "-m", "mistralrs", "run", "-m", str(model_dir), "--isq", "4", "--topology", str(topo),
         "--dtype", "f32", "-i", "hello", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.parametrize("argv,needle", [
    (["--isq", "q4kk"], "--isq 'q4kk' is not a quantization type; choose one of"),
    (["--topology", "{topo}"], "ranges '0-2' and '1-3' overlap"),
    (["--topology", "{missing}"], "missing.yml"),
    (["--topology", "{regex}"], "regex"),
    (["--topology", "{device}"], "unknown device 'gpu0'; write cpu, cuda[N] or metal[N]"),
])
def test_bad_quantization_input_exits_2_with_one_line(model_dir, tmp_path, argv, needle):
    (tmp_path / "bad.yml").write_text("0-2: {isq: q4k}\n1-3: {isq: q8_0}\n")
    (tmp_path / "regex.yml").write_text("'/mlp[/':\n  isq: q4k\n")
    (tmp_path / "device.yml").write_text("0-2:\n  device: gpu0\n")
    files = {"{topo}": "bad.yml", "{missing}": "missing.yml", "{regex}": "regex.yml", "{device}": "device.yml"}
    argv = [str(tmp_path / files[a]) if a in files else a for a in argv]
    out = subprocess.run([sys.executable, "-m", "mistralrs", "run", "-m", str(model_dir), *argv, "-i", "x"],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_from_config_and_server_with_isq(model_dir, tmp_path):
    from mistralrs.config import load_config, service_options
    from mistralrs.serving import ModelService
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f'command = "serve"\n[[models]]\nmodel_id = "{model_dir}"\ndtype = "f32"\n'
                        '[models.quantization]\nin_situ_quant = "q8_0"\n')
    cfg = load_config(cfg_path)
    service = ModelService(service_options(cfg, cfg.models[0]))
    srv = start_server(service)
    try:
        assert _methods(service.loaded.model) == {"q8_0": 15}
        status, _, body = http(srv.url + "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert status == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] >= 1
    finally:
        srv.stop()
        service.shutdown()


def test_quantized_projections_sharing_an_input_are_fused_without_copies(model_dir):
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan

    loaded = load_model(model_dir, dtype="f32", quant_method_for=IsqPlan("q4_0").method_for)
    layer = loaded.model.model.layers[0]
    mlp, attn = layer.mlp, layer.self_attn
    assert mlp._gate_up_q is not None and attn._qkv is not None
    # the halves are views of the fused state: no second copy of the weights
    assert mlp.gate_proj.qweight.data_ptr() == mlp._gate_up_q.qweight.data_ptr()
    assert attn.v_proj.qweight.untyped_storage().data_ptr() == attn._qkv.qweight.untyped_storage().data_ptr()
    x = torch.randn(5, 256)
    fused_mlp, fused_qkv = mlp(x), attn._project(x)
    mlp._gate_up_q = attn._qkv = None  # the per-layer path
    assert torch.equal(fused_mlp, mlp(x))
    for a, b in zip(fused_qkv, attn._project(x)):
        assert torch.equal(a, b)
