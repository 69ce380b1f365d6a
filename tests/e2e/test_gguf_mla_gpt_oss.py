"""GGUF files of DeepSeek V3 (``deepseek2``) and GPT-OSS (``gpt-oss``) end to end: the tokenizer and
chat template from the file's metadata (GPT-OSS's Harmony template, which selects the Harmony
reasoning and tool parsers), `mistralrs run` on the F32 file answering exactly as on the
safetensors checkpoint, and the Q8_0 file served over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

# A Harmony-shaped template (the real one is 300 lines): channels on assistant turns
HARMONY = ("{% for m in messages %}<|start|>{{ m['role'] }}{% if m['role'] == 'assistant' %}<|channel|>final"
           "{% endif %}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
           "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>")


def _checkpoint(kind, path):
    from mistralrs.tokenization import Tokenizer
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    path.mkdir()
    if kind == "gpt_oss":
        from tests.parity.test_gpt_oss_family import _oss as make

        write_tiny_tokenizer(path, chat_template=HARMONY, eos_token="<|return|>", extra_special=HARMONY_TOKENS)
    else:
        from tests.parity.test_deepseek_family import _v3 as make

        write_tiny_tokenizer(path)
    vocab = Tokenizer.from_dir(path).vocab_size
    kw = {} if kind == "gpt_oss" else {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    make(path, vocab_size=vocab, bos_token_id=0, eos_token_id=1, **kw)
    return path


@pytest.fixture(scope="module", params=["deepseekv3", "gpt_oss"])
def files(request, tmp_path_factory):
    from tests.helpers.gguf_writer import write_gguf

    tmp = tmp_path_factory.mktemp(request.param)
    src = _checkpoint(request.param, tmp / "hf")
    return (request.param, src, write_gguf(src, tmp / "model-f32.gguf", outtype="f32"),
            write_gguf(src, tmp / "model-q8_0.gguf", outtype="q8_0"))


def _run(model):
    from tests.e2e.test_gguf import _env

    return subprocess.run([sys.executable, "-m", "mistralrs", "run", "-m", str(model), "--dtype", "f32",
                           "--max-tokens", "8", "--temperature", "0", "-i", "hello there"],
                          capture_output=True, text=True, timeout=300, env=_env())


@pytest.mark.slow  # two CLI runs per architecture (~30 s)
def test_cli_run_on_the_f32_file_answers_as_the_checkpoint(files):
    _, src, f32, _ = files
    from_gguf, from_hf = _run(f32), _run(src)
    assert from_gguf.returncode == 0, from_gguf.stderr
    assert from_hf.returncode == 0, from_hf.stderr
    assert from_gguf.stdout == from_hf.stdout  # same weights, tokenizer and template
    assert from_gguf.stdout.strip()


def test_server_on_the_q8_0_file_with_the_metadata_template_and_parsers(files):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from mistralrs.chat_plan import parser_specs
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    kind, _, _, q8 = files
    runner = Runner(Which.GGUF(quantized_model_id=str(q8), dtype="f32"))
    service = runner.service
    try:
        assert service.loaded.arch.name == kind
        assert service.chat_template.available
        _, reasoning = parser_specs(service, None)
        if kind == "gpt_oss":  # the Harmony template and model_type pick the Harmony parsers
            assert "<|channel|>" in "".join(service.chat_template.templates.values())
            assert reasoning is not None and reasoning.name == "harmony"
        out = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0.0))
        assert out.usage.completion_tokens >= 1
        srv = start_server(service)
        try:
            status, _, body = http(srv.url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                                    "temperature": 0})
            assert status == 200, body
            message = json.loads(body)["choices"][0]["message"]
            assert message["content"] == out.choices[0].message.content
        finally:
            srv.stop()
    finally:
        service.shutdown()


@pytest.mark.slow  # a server process per architecture (~20 s)
def test_mistralrs_serve_on_the_f32_file_answers_as_the_checkpoint(files):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from tests.e2e.conftest import serve_process
    from tests.e2e.test_server import http

    _, src, f32, _ = files
    messages = [{"role": "user", "content": "hello"}]
    runner = Runner(Which.Plain(model_id=str(src), dtype="f32"))
    try:
        want = runner.send_chat_completion_request(ChatCompletionRequest(messages=messages, max_tokens=6,
                                                                         temperature=0.0)).choices[0].message
    finally:
        runner.service.shutdown()
    with serve_process("-m", str(f32), "--dtype", "f32") as url:
        status, _, body = http(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})
        assert status == 200, body
        got = json.loads(body)["choices"][0]["message"]
        assert got["content"] == want.content
        assert got.get("reasoning_content") == getattr(want, "reasoning_content", None)
