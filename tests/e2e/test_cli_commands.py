"""`mistralrs doctor | login | cache | bench | tune | completions` through their real entry points:
`python -m mistralrs ...` in a subprocess for a few, `mistralrs.cli.main([...])` in-process otherwise.
Everything runs offline (HF_HUB_OFFLINE=1) against temporary HF_HOME / hub caches."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mistralrs.cli import main

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch):
    """A fresh HF_HOME, no tokens, no network, for every test."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_TOKEN", "HF_HUB_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return home


def cli(*argv: str) -> int:
    """mistralrs.cli.main in-process; argparse's SystemExit becomes the return code."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


def run_module(*argv: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mistralrs", *argv], capture_output=True, text=True,
                          env=full_env, input=input, timeout=120)


# ----------------------------------------------------------------------------- registration


def test_commands_are_registered_and_cheap_to_import():
    code = (
        "import sys; from mistralrs.cli import build_parser; p = build_parser();"
        "names = set(p._subparsers._group_actions[0].choices);"
        "assert {'doctor', 'login', 'cache', 'bench', 'tune', 'completions'} <= names, names;"
        "assert 'torch' not in sys.modules, 'building the parser imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("argv", "flag"), [
    (["bench", "-m", "demo", "--prompt-len", "many"], "--prompt-len"),
    (["bench", "-m", "demo", "--iterations", "0"], "--iterations"),
    (["bench", "-m", "demo", "--warmup", "-1"], "--warmup"),
    (["tune", "-m", "demo", "--profile", "turbo"], "--profile"),
    (["cache", "delete"], "-m/--model-id"),
    (["cache", "purge"], "ACTION"),
    (["completions", "tcsh"], "shell"),
    (["doctor", "--bogus"], "--bogus"),
    (["login", "--token"], "--token"),
    (["bench"], "-m/--model-id"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "error" in err


# ----------------------------------------------------------------------------- doctor


DOCTOR_KEYS = {"mistralrs_version", "system", "torch", "plugins", "devices", "triton", "auto_dtype", "kernels",
               "attention_backend", "architectures", "hf", "disk", "checks", "ok"}


def broken_plugin_path(root: Path) -> Path:
    """A sys.path entry holding an installed distribution whose mistralrs plugin fails to import."""
    info = root / "broken_mistralrs_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-mistralrs-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mistralrs]\nbroken = broken_mistralrs_plugin\n")
    (root / "broken_mistralrs_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    return root


def test_doctor_json_subprocess(offline_home, tmp_path):
    secret = "hf_doctorsecret123"
    path = broken_plugin_path(tmp_path / "site")
    out = run_module("doctor", "--json", env={"HF_TOKEN": secret, "PYTHONPATH": str(path)})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert DOCTOR_KEYS <= set(report)
    assert secret not in out.stdout and secret not in out.stderr
    cpu = report["system"]["cpu"]
    assert {"arch", "brand", "logical_cores", "extensions"} <= set(cpu)
    if cpu["arch"] == "x86" and Path("/proc/cpuinfo").exists():
        assert {"avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "fma", "amx_bf16"} <= set(cpu["extensions"])
    assert report["torch"]["importable"] and report["torch"]["version"]
    assert report["auto_dtype"] in ("bf16", "f32")
    assert report["kernels"] and all(report["kernels"].values())
    cuda_kernels = report["kernels_by_device"]["cuda"]  # per device: selected kernel, why the others are not
    assert cuda_kernels["rms_norm"]["active"] == "torch" and cuda_kernels["rms_norm"]["inactive"]["triton"]
    assert report["attention_backend"]
    quant = report["quantization"]  # every ISQ type with its real storage cost
    assert quant["q4k"]["bits_per_weight"] == 4.5 and quant["q6k"]["bits_per_weight"] == 6.5625
    assert quant["q8_0"]["bits_per_weight"] == 8.5 and quant["afq4"]["bits_per_weight"] == 5.0
    hf = report["hf"]
    assert hf["home"] == str(offline_home) and hf["cache_dir"] == str(offline_home / "hub")
    assert hf["cache_writable"] is True
    assert hf["token_found"] is True and hf["token_source"] == "env:HF_TOKEN"
    assert hf["connectivity"] == {"checked": False, "endpoint": "https://huggingface.co",
                                  "reason": "HF_HUB_OFFLINE is set"}
    assert report["disk"]["free_bytes"] > 0
    assert report["ok"] is True
    for check in report["checks"]:
        assert check["status"] in ("ok", "info", "warn", "error") and check["name"] and check["message"]
    failed = report["plugins"]["failed"]
    assert [(f["name"], f["distribution"], f["stage"]) for f in failed] == [
        ("broken", "broken-mistralrs-plugin", "import")]
    assert "broken on purpose" in failed[0]["error"]
    plugin_checks = [c for c in report["checks"] if c["name"] == "plugins"]
    assert [c["status"] for c in plugin_checks] == ["warn"]  # a broken plugin is a warning, not an error


def test_doctor_human_checklist(capsys, offline_home):
    assert cli("doctor") == 0
    out = capsys.readouterr().out
    assert out.startswith("mistralrs doctor")
    for name in ("cpu_extensions", "torch", "kernels", "attention", "hf_cache", "hf_token", "disk"):
        assert f"] {name}: " in out
    assert "[INFO] hf_connectivity: skipped (HF_HUB_OFFLINE is set)" in out
    assert "[INFO] kernels: cuda: active: none but the torch reference; triton not used for" in out
    assert "no Hugging Face token" in out
    assert "Ready to run models" in out


def test_doctor_reports_token_file_and_unwritable_cache(capsys, offline_home, tmp_path, monkeypatch):
    offline_home.mkdir(parents=True)
    (offline_home / "token").write_text("hf_fromfile\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("HF_HUB_CACHE", str(locked / "hub"))
    try:
        assert cli("doctor", "--json") == 0  # an unwritable cache is a warning, not an error
        report = json.loads(capsys.readouterr().out)
    finally:
        locked.chmod(0o700)
    assert report["hf"]["token_found"] and report["hf"]["token_source"].startswith("file:")
    cache_check = next(c for c in report["checks"] if c["name"] == "hf_cache")
    if os.geteuid() != 0:  # root writes anywhere
        assert report["hf"]["cache_writable"] is False and cache_check["status"] == "warn"


def test_doctor_exits_1_when_models_cannot_run(capsys):
    """The documented rule: an error-level check (here: no attention backend) -> exit 1."""
    from mistralrs.plugins import PluginHost, reset_plugin_host

    reset_plugin_host(PluginHost(environ={"MISTRALRS_BLOCK_PLUGINS": "attention_sdpa,attention_paged"}))
    try:
        assert cli("doctor") == 1
    finally:
        reset_plugin_host(None)
    out = capsys.readouterr().out
    assert "[ERROR] attention: no attention backend for the cpu" in out
    assert "models cannot run until the errors are fixed" in out


# ----------------------------------------------------------------------------- login


def test_login_writes_token_0600(capsys, offline_home):
    assert cli("login", "--token", "hf_abcdef123") == 0
    out = capsys.readouterr().out
    token_file = offline_home / "token"
    assert token_file.read_text() == "hf_abcdef123"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert str(token_file) in out and "hf_abcdef123" not in out
    # Overwrites, and the default token source now finds it.
    assert cli("login", "--token", "hf_second") == 0
    from mistralrs.hub import resolve_token

    assert resolve_token("cache") == "hf_second"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_login_reads_stdin_and_rejects_empty(offline_home):
    out = run_module("login", input="hf_fromstdin\n")
    assert out.returncode == 0, out.stderr
    assert (offline_home / "token").read_text() == "hf_fromstdin"
    assert stat.S_IMODE((offline_home / "token").stat().st_mode) == 0o600
    assert "hf_fromstdin" not in out.stdout + out.stderr
    empty = run_module("login", input="\n")
    assert empty.returncode == 2 and "token is empty" in empty.stderr


# ----------------------------------------------------------------------------- cache


def make_cached_model(hub: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """A repo laid out as huggingface_hub does: blobs/<sha>, refs/main, snapshots/<commit>/<file> -> blob."""
    import hashlib

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return repo


@pytest.fixture
def hub_cache(tmp_path):
    hub = tmp_path / "hub-cache"
    make_cached_model(hub, "org/small-model", {"config.json": b"{}" * 50, "model.safetensors": b"x" * 4000},
                      "a" * 40)
    make_cached_model(hub, "other/Big-Model", {"config.json": b"{}", "model.safetensors": b"y" * 2_500_000},
                      "b" * 40)
    (hub / ".locks").mkdir()
    (hub / "version.txt").write_text("1")  # written by huggingface_hub; not a repo
    return hub


def test_cache_list_table_and_json(hub_cache, capsys):
    assert cli("cache", "list", "--hf-cache", str(hub_cache)) == 0
    out, err = capsys.readouterr()
    assert err == ""  # stray files such as version.txt are not reported
    assert "HuggingFace Model Cache" in out
    assert "org/small-model" in out and "other/Big-Model" in out
    assert "Model" in out and "Size" in out and "Last Used" in out and "today" in out
    assert "Total: 2 models, 2.5 MB" in out
    assert f"Cache directory: {hub_cache}" in out
    assert cli("cache", "list", "--hf-cache", str(hub_cache), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["model_id"] for m in data["models"]] == ["org/small-model", "other/Big-Model"]
    assert data["models"][0]["size_bytes"] == 4100 and data["total_bytes"] == 4100 + 2_500_002


def test_cache_list_uses_hf_home_and_handles_missing_cache(capsys, offline_home):
    assert cli("cache", "list") == 0
    out = capsys.readouterr().out
    assert "No cached models found." in out and str(offline_home / "hub") in out


def test_cache_delete(hub_cache, capsys):
    assert cli("cache", "delete", "-m", "org/small-model", "--hf-cache", str(hub_cache)) == 0
    out = capsys.readouterr().out
    assert "Deleted org/small-model (4.1 KB freed)" in out
    assert not (hub_cache / "models--org--small-model").exists()
    assert (hub_cache / "models--other--Big-Model").exists()
    # Hub ids are case-insensitive.
    assert cli("cache", "delete", "--model-id", "OTHER/big-model", "--hf-cache", str(hub_cache)) == 0
    assert "Deleted other/Big-Model (2.5 MB freed)" in capsys.readouterr().out
    assert not any(p.name.startswith("models--") for p in hub_cache.iterdir())


def test_cache_delete_unknown_model_exits_1(hub_cache, capsys):
    assert cli("cache", "delete", "-m", "nobody/nothing", "--hf-cache", str(hub_cache)) == 1
    err = capsys.readouterr().err
    assert "nobody/nothing" in err and "not in the Hugging Face cache" in err and "cache list" in err


# ----------------------------------------------------------------------------- tune


def test_tune_demo_json_and_emit_config(tmp_path, capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    toml_path = tmp_path / "cfg" / "tuned.toml"
    assert cli("tune", "-m", "demo", "--json", "--emit-config", str(toml_path)) == 0
    report = json.loads(capsys.readouterr().out)
    quants = [c["quant"] for c in report["candidates"]]
    assert quants == ["none", "q8_0", "q6k", "q5k", "q4k", "q3k", "q2k"]
    sizes = [c["size_bytes"] for c in report["candidates"]]
    assert sizes == sorted(sizes, reverse=True)
    assert report["parameters"] == 3_131_136  # the demo Llama, counted on the meta device
    assert report["profile"] == "balanced" and report["backend"] == "cpu"
    assert report["recommended_per_profile"] == {"quality": "none", "balanced": "q8_0", "fast": "q4k"}
    assert report["recommended_isq"] == "q8_0"
    assert report["recommended_command"] == "mistralrs serve -m demo --isq q8_0"
    assert [c["quant"] for c in report["candidates"] if c["recommended"]] == ["q8_0"]
    for c in report["candidates"]:
        assert c["status"] == "fits" and c["context_room"] == 4096 and c["context_room_is_max"]
        assert c["quality"] in ("Baseline", "Near-lossless", "Good", "Acceptable", "Degraded")
    assert report["kv_bytes_per_token"] == 4 * 2 * (64 + 64) * (2 if report["dtype"] == "bf16" else 4)
    config = tomllib.loads(toml_path.read_text())
    assert config["command"] == "serve"
    assert config["server"] == {"host": "0.0.0.0", "port": 1234}
    assert config["runtime"] == {"max_seqs": 32}
    assert config["models"] == [{"model_id": "demo", "dtype": "auto", "quantization": {"in_situ_quant": "q8_0"}}]


def test_tune_human_table(capsys):
    assert cli("tune", "-m", "demo", "--profile", "fast", "--cpu") == 0
    out = capsys.readouterr().out
    assert "Tuning Analysis" in out and "Profile: Fast" in out and "Backend: cpu" in out
    for header in ("Quant", "Est. Size", "RAM %", "Context Room", "Quality", "Status"):
        assert header in out
    assert "Q4K" in out and "Recommended" in out and "4k (max)" in out
    assert "mistralrs serve -m demo --isq q4k --cpu" in out


def test_tune_config_only_directory(tmp_path, capsys):
    model = tmp_path / "llama-8b-config"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    assert cli("tune", "-m", str(model), "--dtype", "bf16", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 8_030_261_248  # Llama-3-8B
    by = {c["quant"]: c for c in report["candidates"]}
    assert by["none"]["size_bytes"] == 2 * 8_030_261_248
    # q4k: matrices at 4.5 bpw, embeddings and lm_head at q6k's 6.5625, norms at 16 bits.
    groups = report["parameter_groups"]
    assert by["q4k"]["size_bytes"] == int((groups["linear"] * 4.5 + (groups["embedding"] + groups["lm_head"])
                                           * 6.5625 + groups["other"] * 16) / 8)
    assert report["kv_bytes_per_token"] == 32 * 8 * 128 * 2 * 2
    assert report["max_context"] == 131072
    room = [c["context_room"] for c in report["candidates"]]
    assert room == sorted(room)  # smaller weights leave more room for the KV cache


def test_tune_too_large_and_unknown_architecture(tmp_path, capsys):
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps({**LLAMA_8B, "architectures": ["FooForCausalLM"],
                                                  "model_type": "foo", "hidden_size": 65536,
                                                  "intermediate_size": 262144, "num_hidden_layers": 200}))
    assert cli("tune", "-m", str(huge), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size_method"] == "config formula"
    assert any("Llama-style formula" in n for n in report["notes"])
    assert {c["status"] for c in report["candidates"]} == {"too_large"}
    assert report["recommended_isq"] is None and report["recommended_command"] is None
    assert cli("tune", "-m", str(huge)) == 0
    assert "the model does not fit" in capsys.readouterr().out


def test_tune_missing_model_exits_1(tmp_path, capsys):
    assert cli("tune", "-m", str(tmp_path / "nope")) == 1
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bench


def test_bench_demo_json_and_table(capsys):
    common = ["bench", "-m", "demo", "--prompt-len", "16", "--gen-len", "4", "--iterations", "1", "--warmup", "0"]
    assert cli(*common, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "demo" and report["iterations"] == 1 and report["device"] == "cpu"
    prefill, decode = report["results"]
    assert prefill["test"] == "prefill" and prefill["prompt_len"] == 16 and prefill["name"] == "Prefill (16 tokens)"
    assert prefill["tok_per_sec"] > 0 and prefill["ttft_ms"] > 0 and prefill["std_dev"] == 0
    assert decode["test"] == "decode" and decode["gen_len"] == 4 and decode["name"] == "Decode (4 tokens)"
    assert decode["tok_per_sec"] > 0 and decode["ms_per_token"] == pytest.approx(1e3 / decode["tok_per_sec"])
    assert cli(*common[:-2], "--warmup", "1", "--iterations", "2", "--gen-len", "0") == 0
    out = capsys.readouterr().out
    assert "Benchmark Results" in out and "Model: demo" in out and "Iterations: 2" in out
    assert "Prefill (16 tokens)" in out and "ms (TTFT)" in out and "±" in out
    assert "Decode" not in out  # --gen-len below 2 skips the decode test


def test_bench_rejects_nothing_to_do_and_too_long(capsys):
    assert cli("bench", "-m", "demo", "--prompt-len", "0", "--gen-len", "1") == 2
    assert "nothing to benchmark" in capsys.readouterr().err
    assert cli("bench", "-m", "demo", "--prompt-len", "5000", "--gen-len", "0", "--iterations", "1",
               "--warmup", "0") == 2
    assert "context of 4096" in capsys.readouterr().err


# ----------------------------------------------------------------------------- completions


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish", "elvish", "powershell"])
def test_completions_cover_every_command(shell, capsys):
    from mistralrs.cli import build_parser

    assert cli("completions", shell) == 0
    script = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert name in script
    if shell in ("bash", "zsh"):
        for option in ("--emit-config", "--prompt-len", "--hf-cache", "--model-id"):
            assert option in script


def _bash_complete(script: Path, *words: str) -> list[str]:
    prog = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
            f"COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))\n_mistralrs\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_script_works(tmp_path):
    from mistralrs.cli import build_parser

    out = run_module("completions", "bash")
    assert out.returncode == 0, out.stderr
    script = tmp_path / "mistralrs.bash"
    script.write_text(out.stdout)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    commands = sorted(build_parser()._subparsers._group_actions[0].choices)
    assert _bash_complete(script, "mistralrs", "se") == [c for c in commands if c.startswith("se")]
    if "serve" in commands:
        assert _bash_complete(script, "mistralrs", "se") == ["serve"]
    assert _bash_complete(script, "mistralrs", "do") == ["doctor"]
    assert sorted(_bash_complete(script, "mistralrs", "")) == commands
    assert sorted(_bash_complete(script, "mistralrs", "cache", "")) == ["delete", "list"]
    assert sorted(_bash_complete(script, "mistralrs", "-v", "cache", "delete", "--")) == [
        "--help", "--hf-cache", "--model-id"]
    assert _bash_complete(script, "mistralrs", "tune", "-m", "demo", "--pro") == ["--profile"]
    assert _bash_complete(script, "mistralrs", "tune", "--profile", "") == ["quality", "balanced", "fast"]
    assert _bash_complete(script, "mistralrs", "completions", "z") == ["zsh"]
    assert _bash_complete(script, "mistralrs", "bench", "--prompt-l") == ["--prompt-len"]
    from mistralrs.cli.model_options import MODEL_KINDS

    assert sorted(_bash_complete(script, "mistralrs", "bench", "")) == sorted(MODEL_KINDS)


def test_tune_describes_a_prequantized_checkpoint(tmp_path, capsys):
    model = tmp_path / "llama-8b-gptq"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA_8B, "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}}))
    assert cli("tune", "-m", str(model), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prequantized"].startswith("gptq (bits=4, group_size=128")
    assert any("pre-quantized" in n for n in report["notes"])
    (model / "config.json").write_text(json.dumps({**LLAMA_8B, "quantization_config": {"quant_method": "exl2"}}))
    assert cli("tune", "-m", str(model), "--json") == 0
    assert "'exl2' is not supported" in json.loads(capsys.readouterr().out)["prequantized"]
