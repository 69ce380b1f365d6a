"""GGUF files of the MoE and hybrid families end to end (Phi-3.5-MoE ``phimoe``, GLM-4.5
``glm4moe``, GLM-4.7-Flash as ``deepseek2``, Granite 4.0 H ``granitehybrid``, LFM2 ``lfm2``,
Qwen3-Next ``qwen3next``): the tokenizer and chat template from the file's metadata, the Q8_0
file answering a chat request through the Python API, and `mistralrs run` on the F32 file
answering exactly as on the safetensors checkpoint (slow)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

# architecture -> (the parity module, its checkpoint builder)
MAKERS = {
    "phi3.5moe": ("test_phimoe_glm4moe_family", "_phimoe_hub"),
    "glm4moe": ("test_phimoe_glm4moe_family", "_glm4moe"),
    "glm4moelite": ("test_phimoe_glm4moe_family", "_glm4moelite_hub"),
    "granitemoehybrid": ("test_hybrid_family", "_granite"),
    "lfm2": ("test_hybrid_family", "_lfm2"),
    "qwen3next": ("test_hybrid_family", "_qwen3next"),
}


@pytest.fixture(scope="module", params=list(MAKERS))
def files(request, tmp_path_factory):
    from mistralrs.tokenization import Tokenizer
    from tests.helpers.gguf_writer import write_gguf
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    tmp = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    src = tmp / "hf"
    src.mkdir()
    write_tiny_tokenizer(src)
    module, maker = MAKERS[request.param]
    make = getattr(importlib.import_module(f"tests.parity.{module}"), maker)
    make(src, vocab_size=Tokenizer.from_dir(src).vocab_size, bos_token_id=0, eos_token_id=1)
    return request.param, src, write_gguf(src, tmp / "model-q8_0.gguf", outtype="q8_0")


def test_q8_0_file_answers_a_chat_request(files):
    from mistralrs import ChatCompletionRequest, Runner, Which

    arch, _, q8 = files
    runner = Runner(Which.GGUF(quantized_model_id=str(q8), dtype="f32"))
    try:
        assert runner.service.loaded.arch.name == arch
        assert runner.service.chat_template.available
        out = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0.0))
        assert out.usage.completion_tokens >= 1
    finally:
        runner.service.shutdown()


def _run(model):
    from tests.e2e.test_gguf import _env

    return subprocess.run([sys.executable, "-m", "mistralrs", "run", "-m", str(model), "--dtype", "f32",
                           "--max-tokens", "8", "--temperature", "0", "-i", "hello there"],
                          capture_output=True, text=True, timeout=300, env=_env())


@pytest.mark.slow  # two CLI runs per architecture (~15 s)
def test_cli_run_on_the_f32_file_answers_as_the_checkpoint(files, tmp_path):
    from tests.helpers.gguf_writer import write_gguf

    _, src, _ = files
    f32 = write_gguf(src, tmp_path / "model-f32.gguf", outtype="f32")
    from_gguf, from_hf = _run(f32), _run(src)
    assert from_gguf.returncode == 0, from_gguf.stderr
    assert from_hf.returncode == 0, from_hf.stderr
    assert from_gguf.stdout == from_hf.stdout  # same weights, tokenizer and template
    assert from_gguf.stdout.strip()
