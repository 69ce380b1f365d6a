"""GGUF models end to end: `mistralrs run` with a .gguf path, with -m DIR -f NAME and --quant,
the tokenizer and chat template from the GGUF metadata or from --tok-model-id, the HTTP server,
`Runner(Which.GGUF(...))`, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.tiny_models import write_tiny_llama

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    from tests.helpers.gguf_writer import write_gguf

    src = write_tiny_llama(tmp_path_factory.mktemp("gguf") / "llama", hidden_size=64, intermediate_size=128)
    repo = tmp_path_factory.mktemp("gguf-repo")
    write_gguf(src, repo / "tiny-llama-Q8_0.gguf", outtype="q8_0")
    write_gguf(src, repo / "tiny-llama-F16.gguf", outtype="f16")
    return src, repo


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "mistralrs", "run", *argv, "--max-tokens", "6", "--temperature", "0",
                           "-i", "hello there"], capture_output=True, text=True, timeout=timeout, env=_env())


def test_cli_run_answers_alike_from_every_way_of_naming_the_file(gguf_dir):
    src, repo = gguf_dir
    by_path = _run("-m", str(repo / "tiny-llama-Q8_0.gguf"))
    assert by_path.returncode == 0, by_path.stderr
    by_name = _run("-m", str(repo), "-f", "tiny-llama-Q8_0.gguf")
    by_quant = _run("-m", str(repo), "--quant", "q8")
    with_tok = _run("-m", str(repo / "tiny-llama-Q8_0.gguf"), "--tok-model-id", str(src))
    for other in (by_name, by_quant, with_tok):
        assert other.returncode == 0, other.stderr
        assert other.stdout == by_path.stdout  # same weights, same tokens, same template
    assert by_path.stdout.strip()


def test_runner_and_server_serve_a_gguf_model(gguf_dir):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    _, repo = gguf_dir
    runner = Runner(Which.GGUF(quantized_model_id=str(repo), quantized_filename="tiny-llama-Q8_0.gguf", dtype="f32"))
    service = runner.service
    try:
        from mistralrs.nn.linear import describe_methods

        # the projections of both layers, the head and the token table (a quantized Linear of the embedding)
        assert describe_methods(service.loaded.model) == {"q8_0": 2 * 7 + 2}
        assert service.loaded.model.model.embed_tokens.weight is None  # the Q8_0 token table stays quantized
        assert service.chat_template.available  # from tokenizer.chat_template
        out = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0.0))
        assert out.usage.completion_tokens >= 1
        srv = start_server(service)
        try:
            status, _, body = http(srv.url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                                    "temperature": 0})
            assert status == 200, body
            assert json.loads(body)["choices"][0]["message"]["content"] == out.choices[0].message.content
        finally:
            srv.stop()
    finally:
        service.shutdown()


def test_several_files_need_a_choice_and_bad_files_are_one_line_errors(gguf_dir, tmp_path):
    _, repo = gguf_dir
    both = _run("-m", str(repo), "--format", "gguf")
    assert both.returncode != 0 and "holds several GGUF models" in both.stderr and "--quant" in both.stderr
    missing = _run("-m", str(repo), "-f", "nope.gguf")
    assert missing.returncode != 0 and "nope.gguf" in missing.stderr
    auto = _run("-m", str(repo), "--quant", "auto")
    assert auto.returncode == 2 and "--quant auto" in auto.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    notg = _run("-m", str(bad))
    assert notg.returncode != 0 and "not a GGUF file" in notg.stderr
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes((repo / "tiny-llama-F16.gguf").read_bytes()[:-4096])
    t = _run("-m", str(trunc))
    assert t.returncode != 0 and "truncated" in t.stderr
    for r in (missing, notg, t):
        assert len([line for line in r.stderr.splitlines() if "error" in line.lower()]) == 1, r.stderr


def test_unknown_architecture_lists_the_supported_ones(gguf_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(path, "rwkv7")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = _run("-m", str(path))
    assert r.returncode != 0
    assert "GGUF architecture 'rwkv7' is not supported" in r.stderr and "llama" in r.stderr


def test_debug_env_writes_the_tensor_list(gguf_dir, tmp_path):
    _, repo = gguf_dir
    shutil.copy(repo / "tiny-llama-F16.gguf", tmp_path / "m.gguf")
    env = {**_env(), "MISTRALRS_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "mistralrs", "run", "-m", str(tmp_path / "m.gguf"), "-i", "hi",
                        "--max-tokens", "2"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listing = (tmp_path / "mistralrs_gguf_tensors.txt").read_text()
    assert "blk.0.attn_q.weight: shape=[64, 64] type=F16" in listing


def test_named_chat_templates_come_from_the_metadata(gguf_dir, tmp_path):
    from mistralrs import Runner, Which
    from tests.helpers.gguf_writer import write_gguf

    src, _ = gguf_dir
    path = write_gguf(src, tmp_path / "named.gguf", outtype="f16",
                      extra_strings={"tokenizer.chat_template.tool_use": "{{ 'TOOLS:' + messages[0]['content'] }}"})
    runner = Runner(Which.GGUF(quantized_model_id=str(path)))
    try:
        template = runner.service.chat_template
        assert set(template.names) == {"default", "tool_use"}
        assert template.select(tools=[{"type": "function"}]).startswith("{{ 'TOOLS:'")
    finally:
        runner.service.shutdown()


def test_the_format_is_the_files_magic_not_its_name(gguf_dir, tmp_path):
    _, repo = gguf_dir
    renamed = tmp_path / "model.bin"
    shutil.copy(repo / "tiny-llama-F16.gguf", renamed)
    assert _run("-m", str(renamed)).stdout == _run("-m", str(repo / "tiny-llama-F16.gguf")).stdout
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    r = _run("-m", str(other))
    assert r.returncode != 0 and "neither GGUF nor GGML" in r.stderr


def test_hub_repository_of_gguf_files_offline_from_the_cache(gguf_dir, tmp_path):
    """`-m org/repo --quant LEVEL` and `-f NAME` against a hub-layout cache with HF_HUB_OFFLINE=1:
    the choice is made from the repository's listing, and only that file is needed."""
    from tests.helpers.hub_cache import hub_snapshot

    _, repo = gguf_dir
    hub_snapshot(tmp_path / "cache", "acme/tiny-llama-GGUF",
                 {name: repo / name for name in ("tiny-llama-Q8_0.gguf", "tiny-llama-F16.gguf")})
    cache = str(tmp_path / "cache")
    local = _run("-m", str(repo / "tiny-llama-Q8_0.gguf"))
    by_quant = _run("-m", "acme/tiny-llama-GGUF", "--hf-cache", cache, "--quant", "8")
    by_name = _run("-m", "acme/tiny-llama-GGUF", "--hf-cache", cache, "-f", "tiny-llama-Q8_0.gguf")
    for r in (by_quant, by_name):
        assert r.returncode == 0, r.stderr
        assert r.stdout == local.stdout
    missing = _run("-m", "acme/tiny-llama-GGUF", "--hf-cache", cache, "--quant", "q4k")
    assert missing.returncode != 0 and "levels there: F16, Q80" in missing.stderr
