"""UQFF end to end: `mistralrs quantize` (directory and file mode, several types), `run` and
`from-config` with `--from-uqff` answering as `--isq` does, `Which.Plain(write_uqff=, from_uqff=)`
through the Runner and the HTTP server, a Hub repository of UQFF files offline from the cache, and
bad input as one-line errors with exit code 2 for flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("uqff-e2e") / "llama", hidden_size=256, intermediate_size=512,
                            tie_word_embeddings=True)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "MISTRALRS_NO_PROGRESS": "1"}


def _cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "mistralrs", *argv], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _run(*argv):
    return _cli("run", *argv, "--max-tokens", "6", "--temperature", "0", "-i", "hello there")


@pytest.fixture(scope="module")
def quantized(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uqff-out") / "tiny-UQFF"
    r = _cli("quantize", "-m", str(model_dir), "--isq", "q4k,q8_0", "--isq", "4", "-o", str(out) + "/")
    assert r.returncode == 0, r.stderr
    return out, r


def test_quantize_writes_a_directory_per_type_with_card_and_report(quantized):
    out, r = quantized
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "q4k-0.uqff", "q8_0-0.uqff",
                     "residual.safetensors", "tokenizer.json", "tokenizer_config.json", "uqff_report.json"]
    report = json.loads((out / "uqff_report.json").read_text())
    assert [o["quant"] for o in report["outputs"]] == ["q4k", "q8_0"]  # "4" is q4k on the CPU: once
    assert "huggingface-cli upload" in r.stderr and "--from-uqff q4k-0.uqff" in r.stderr
    assert "q4k-0.uqff" in (out / "README.md").read_text()


def test_run_from_uqff_answers_as_isq_does(model_dir, quantized):
    out, _ = quantized
    for isq in ("q4k", "q8_0"):
        want = _run("-m", str(model_dir), "--isq", isq)
        assert want.returncode == 0, want.stderr
        for value in (f"{isq}-0.uqff", isq, str(out / f"{isq}-0.uqff")):
            got = _run("-m", str(out), "--from-uqff", value)
            assert got.returncode == 0, got.stderr
            assert got.stdout == want.stdout, (isq, value)


def test_file_mode_names_shards_after_the_path(model_dir, tmp_path):
    r = _cli("quantize", "-m", str(model_dir), "--isq", "q8_0", "-o", str(tmp_path / "x" / "tiny-q8.uqff"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "tiny-q8-0.uqff").is_file() and not (tmp_path / "x" / "README.md").exists()
    got = _run("-m", str(tmp_path / "x"), "--from-uqff", "tiny-q8-0.uqff")
    assert got.returncode == 0 and got.stdout == _run("-m", str(model_dir), "--isq", "q8_0").stdout


def test_runner_writes_and_reads_uqff_and_the_server_serves_it(model_dir, tmp_path):
    from mistralrs import ChatCompletionRequest, Runner, Which
    from tests.e2e.conftest import start_server
    from tests.e2e.test_server import http

    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0)
    writer = Runner(Which.Plain(model_id=str(model_dir), dtype="f32", write_uqff=str(tmp_path / "out")),
                    in_situ_quant="Q4K")
    try:
        want = writer.send_chat_completion_request(request).choices[0].message.content
    finally:
        writer.service.shutdown()
    assert (tmp_path / "out" / "q4k-0.uqff").is_file() and (tmp_path / "out" / "residual.safetensors").is_file()
    reader = Runner(Which.Plain(model_id=str(tmp_path / "out"), dtype="f32", from_uqff=["q4k-0.uqff"]))
    try:
        assert reader.send_chat_completion_request(request).choices[0].message.content == want
        srv = start_server(reader.service)
        try:
            status, _, body = http(srv.url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0})
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == want
        finally:
            srv.stop()
    finally:
        reader.service.shutdown()


def test_from_config_loads_uqff(quantized, tmp_path):
    from mistralrs.config import load_config, service_options
    from mistralrs.nn.linear import describe_methods
    from mistralrs.serving import ModelService

    out, _ = quantized
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
command = "serve"
[[models]]
model_id = "{out}"
dtype = "f32"
[models.quantization]
from_uqff = "q8_0-0.uqff"
""")
    config = load_config(cfg)
    opts = service_options(config, config.models[0])
    assert opts.from_uqff == ("q8_0-0.uqff",)
    service = ModelService(opts)
    try:
        assert {f.name for f in service.loaded.weight_files} == {"q8_0-0.uqff", "residual.safetensors"}
        assert describe_methods(service.loaded.model) == {"q8_0": 2 * 7 + 1}
    finally:
        service.shutdown()


def test_hub_repository_of_uqff_files_offline_from_the_cache(model_dir, quantized, tmp_path):
    """`-m org/repo --from-uqff q4k` against a hub-layout cache: the shard set and the residual
    are chosen from the repository's listing."""
    from tests.helpers.hub_cache import hub_snapshot

    out, _ = quantized
    hub_snapshot(tmp_path / "cache", "acme/tiny-UQFF", {p.name: p for p in out.iterdir()})
    got = _run("-m", "acme/tiny-UQFF", "--hf-cache", str(tmp_path / "cache"), "--from-uqff", "q4k")
    assert got.returncode == 0, got.stderr
    assert got.stdout == _run("-m", str(model_dir), "--isq", "q4k").stdout
    missing = _run("-m", "acme/tiny-UQFF", "--hf-cache", str(tmp_path / "cache"), "--from-uqff", "q2k-0.uqff")
    assert missing.returncode != 0 and "has no such UQFF file (it has: q4k-0.uqff, q8_0-0.uqff)" in missing.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--from-uqff", "q4k-0.uqff", "--isq", "q8_0"], "--from-uqff and --isq conflict"),
    (["--from-uqff", "nope-0.uqff"], "--from-uqff nope-0.uqff: no such UQFF file"),
])
def test_bad_uqff_input_is_one_line(quantized, argv, needle):
    out, _ = quantized
    r = _run("-m", str(out), *argv)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1


def test_quantize_bad_input_exits_2(model_dir, tmp_path):
    r = _cli("quantize", "-m", str(model_dir), "--isq", "q4k,q8_0", "-o", str(tmp_path / "one.uqff"))
    assert r.returncode == 2 and "need a directory" in r.stderr
    r = _cli("quantize", "-m", str(model_dir), "--isq", "q9k", "-o", str(tmp_path / "d"))
    assert r.returncode == 2 and "is not a quantization type" in r.stderr


def test_uqff_report_verify_inspect(quantized, tmp_path):
    out, _ = quantized
    r = _cli("uqff", "verify", "-m", str(out), "--strict", "--json")
    assert r.returncode == 0, r.stderr
    verdict = json.loads(r.stdout)
    assert verdict["ok"] and verdict["outputs"]["q4k"]["stored"] == {"q4k": 14, "q6k": 1}
    r = _cli("uqff", "report", "-m", str(out / "q8_0-0.uqff"), "--quant", "8", "--json")
    assert r.returncode == 0, r.stderr
    (output,) = json.loads(r.stdout)["outputs"]
    assert output["quant"] == "q8_0" and output["shards"] == ["q8_0-0.uqff"] and output["layers"] == 15
    r = _cli("uqff", "inspect", "-m", str(out), "--quant", "q4k", "--json")
    rows = {row["module"]: row for row in json.loads(r.stdout)}
    assert rows["model.embed_tokens"]["stored"] == "q6k" and rows["model.layers.1.mlp.down_proj"]["shape"] == [256, 512]
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "residual.safetensors").unlink()
    shard = broken / "q4k-0.uqff"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = _cli("uqff", "verify", "-m", str(broken))
    assert r.returncode == 1
    assert "q4k-0.uqff: not a readable UQFF" in r.stderr and "residual.safetensors: missing" in r.stderr
