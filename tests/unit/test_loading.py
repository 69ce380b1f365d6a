"""mistralrs.loading and mistralrs.dtypes: dtype resolution, checkpoint layouts, dummy weights,
the linear-method life cycle, and the one-line errors for broken model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistralrs.dtypes import resolve_dtype
from mistralrs.errors import ConfigError, ModelLoadError
from mistralrs.loading import build_attention_backend, generate_greedy, load_model
from tests.helpers.parity import assert_logits_match, make_tiny_hf_model, our_logits

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "name, expected",
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("f16", torch.float16), ("float16", torch.float16),
     ("half", torch.float16), ("f32", torch.float32), ("float32", torch.float32), ("F32", torch.float32),
     (torch.float16, torch.float16)],
)
def test_resolve_dtype_names(name, expected):
    assert resolve_dtype(name, "cpu") is expected


def test_resolve_dtype_auto_follows_cpu_bf16_support(monkeypatch):
    import mistralrs.dtypes as d

    monkeypatch.setattr(d, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(d, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32


def test_cpu_bf16_probe_reads_cpuinfo_flags():
    import mistralrs.dtypes as d

    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    assert d.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ConfigError, match="unknown dtype 'q4'"):
        resolve_dtype("q4")
    with pytest.raises(ConfigError):
        resolve_dtype(torch.int8)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                              tmp_path_factory.mktemp("llama"))


@pytest.fixture
def llama_copy(tiny_llama, tmp_path):
    path, hf = tiny_llama
    dst = tmp_path / "model"
    shutil.copytree(path, dst)
    return dst, hf


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


# --------------------------------------------------------------------------- checkpoints


def test_loads_fp32_and_casts_to_requested_dtype(tiny_llama):
    path, hf = tiny_llama
    loaded = load_model(path, dtype="bf16")
    assert loaded.dtype is torch.bfloat16 and loaded.arch.name == "llama"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model_dir == Path(path) and loaded.weight_files == (Path(path) / "model.safetensors",)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.weight_bytes == sum(p.numel() * 2 for p in loaded.model.parameters())


def test_sharded_checkpoint(tmp_path):
    path, hf = make_tiny_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path,
                                  max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(path, dtype="f32")
    assert len(loaded.weight_files) > 1
    assert_logits_match(path, hf)


def test_no_mmap_reads_bytes(tiny_llama, monkeypatch):
    import mistralrs.loading as L

    path, hf = tiny_llama
    used = []
    real = L._iter_bytes
    monkeypatch.setattr(L, "_iter_bytes", lambda p: (used.append(p), real(p))[1])
    monkeypatch.setenv("MISTRALRS_NO_MMAP", "1")
    assert_logits_match(path, hf)
    assert used and all(p.name == "model.safetensors" for p in used)


def test_mmap_window_reopens_without_changing_results(tiny_llama, monkeypatch):
    import mistralrs.loading as L

    path, hf = tiny_llama
    monkeypatch.setattr(L, "_MMAP_WINDOW", 1)  # re-open the file after every tensor
    assert_logits_match(path, hf)


def test_model_files_like_source(tiny_llama):
    path, hf = tiny_llama
    files = SimpleNamespace(root=path, config=path / "config.json", weights=(path / "model.safetensors",))
    loaded = load_model(files, dtype="f32")
    ids = torch.arange(10)
    torch.testing.assert_close(our_logits(loaded, ids), hf(ids[None]).logits[0], atol=1e-4, rtol=0)


def test_arch_override_by_spec_and_hf_name(llama_copy):
    path, _ = llama_copy
    cfg = json.loads((path / "config.json").read_text())
    del cfg["architectures"], cfg["model_type"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    assert "config.json" in _one_line(exc) and "--arch" in str(exc.value)
    assert load_model(path, arch="llama", dtype="f32").arch.name == "llama"
    assert load_model(path, arch="LlamaForCausalLM", dtype="f32").arch.name == "llama"


def test_model_type_fallback(llama_copy):
    path, _ = llama_copy
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["SomethingElseForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_model(path, dtype="f32").arch.name == "llama"  # model_type "llama"


def test_tied_checkpoint_with_redundant_lm_head_and_inv_freq(llama_copy):
    path, hf = llama_copy
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    st = path / "model.safetensors"
    tensors = load_file(st)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old HF checkpoints carry these
    save_file(tensors, st)
    loaded = load_model(path, dtype="f32")
    assert loaded.model.lm_head is None
    h = torch.randn(2, 64)
    torch.testing.assert_close(loaded.model.compute_logits(h), h @ tensors["model.embed_tokens.weight"].T)


# --------------------------------------------------------------------------- dummy weights


def test_dummy_weights_need_only_config(tiny_llama, tmp_path):
    path, _ = tiny_llama
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a = load_model(tmp_path, dtype="f32", dummy_weights=True)
    b = load_model(tmp_path, dtype="f32", dummy_weights=True)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # deterministic
    assert torch.all(sa["model.norm.weight"] == 1.0)
    w = sa["model.layers.0.mlp.up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002
    c = load_model(tmp_path, dtype="f32", dummy_weights=True, seed=1)
    assert not torch.equal(c.model.state_dict()["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    logits = our_logits(a, torch.arange(5))
    assert logits.shape == (5, 320) and torch.isfinite(logits).all()


# ----------------------------------------------------------------- linear-method life cycle


class _CountingMethod:
    """An 'int8' quantizer: creates fp weights, quantizes them after loading."""

    instances: list = []

    def __init__(self):
        self.processed = 0
        _CountingMethod.instances.append(self)

    def create_weights(self, layer):
        layer.weight = torch.nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        layer.register_parameter("bias", None)

    def process_after_loading(self, layer):
        self.processed += 1
        assert not layer.weight.is_meta and torch.isfinite(layer.weight).all()
        scale = layer.weight.float().abs().amax(1, keepdim=True) / 127
        layer.q = torch.nn.Parameter((layer.weight.float() / scale).round().to(torch.int8), requires_grad=False)
        layer.s = torch.nn.Parameter(scale, requires_grad=False)
        del layer.weight

    def apply(self, layer, x):
        return torch.nn.functional.linear(x, (layer.q.float() * layer.s).to(x.dtype))

    def describe(self):
        return "int8-test"


def test_quant_method_life_cycle_through_loader(tiny_llama):
    path, hf = tiny_llama
    _CountingMethod.instances.clear()
    seen = []

    def choose(name, layer):
        seen.append(name)
        return None if name == "lm_head" else _CountingMethod()

    loaded = load_model(path, dtype="f32", quant_method_for=choose)
    assert "lm_head" in seen and "model.layers.1.mlp.down_proj" in seen
    assert len(_CountingMethod.instances) == 2 * 7
    assert all(m.processed == 1 for m in _CountingMethod.instances)
    ids = torch.arange(12)
    diff = (our_logits(loaded, ids) - hf(ids[None]).logits[0]).abs().max()
    assert 0 < diff < 0.2  # quantized: close, not equal


# ------------------------------------------------------------------ backend and generation


def test_build_attention_backend_and_greedy_with_and_without_cache(tiny_llama):
    path, _ = tiny_llama
    loaded = load_model(path, dtype="f32")
    from mistralrs.plugins import get_registry

    be = build_attention_backend(loaded, num_blocks=4, block_size=8)  # the best registered backend
    assert be.name == get_registry().attention_backends.select(device="cpu", dtype="float32", head_dim=16).name
    assert (be.shape.num_layers, be.shape.num_kv_heads, be.shape.head_dim) == (2, 2, 16)
    assert be.shape.dtype is torch.float32 and be.num_blocks == 4
    prompt = [5, 9, 200, 17, 3]
    cached = generate_greedy(loaded, be, prompt, 20)
    uncached = generate_greedy(loaded, build_attention_backend(loaded.model, name="sdpa"), prompt, 20)
    assert cached == uncached and len(cached) == 20
    stop = cached[3]
    assert generate_greedy(loaded, build_attention_backend(loaded, name="sdpa"), prompt, 20,
                           eos_token_ids=[stop]) == cached[:cached.index(stop) + 1]
    with pytest.raises(ValueError, match="blocks"):
        generate_greedy(loaded, be, prompt, 40)


# -------------------------------------------------------------------------------- errors


def test_error_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError) as exc:
        load_model(missing)
    assert str(missing) in _one_line(exc) and "does not exist" in str(exc.value)


def test_error_missing_config(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path)
    assert "config.json" in _one_line(exc) and str(tmp_path) in str(exc.value)


def test_error_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path)
    msg = _one_line(exc)
    assert "config.json line 3" in msg and "malformed JSON" in msg


def test_error_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ModelLoadError) as exc:
        load_model(tmp_path)
    msg = _one_line(exc)
    assert "FooForCausalLM" in msg and "config.json" in msg
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg


def test_error_missing_config_key(llama_copy):
    path, _ = llama_copy
    cfg = json.loads((path / "config.json").read_text())
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    assert "'hidden_size'" in _one_line(exc)


def test_error_no_weights(llama_copy):
    path, _ = llama_copy
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert "no *.safetensors" in _one_line(exc) and str(path) in str(exc.value)
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(path)


def test_error_missing_tensor(llama_copy):
    path, _ = llama_copy
    st = path / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, st)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    msg = _one_line(exc)
    assert "'model.layers.1.post_attention_layernorm.weight'" in msg and "model.safetensors" in msg


def test_error_misshaped_tensor(llama_copy):
    path, _ = llama_copy
    st = path / "model.safetensors"
    tensors = load_file(st)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, st)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    msg = _one_line(exc)
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and str(st) in msg
    assert "[64, 64]" in msg and "[32, 64]" in msg


def test_error_unexpected_tensor(llama_copy):
    path, _ = llama_copy
    st = path / "model.safetensors"
    tensors = load_file(st)
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(tensors, st)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    assert "'model.layers.0.mystery.weight'" in _one_line(exc) and "model.safetensors" in str(exc.value)


@pytest.mark.parametrize("no_mmap", ["0", "1"])
def test_error_truncated_safetensors(llama_copy, monkeypatch, no_mmap):
    monkeypatch.setenv("MISTRALRS_NO_MMAP", no_mmap)
    path, _ = llama_copy
    st = path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    msg = _one_line(exc)
    assert str(st) in msg and "truncated or corrupt" in msg


def test_error_garbage_safetensors(llama_copy):
    path, _ = llama_copy
    (path / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ModelLoadError, match="model.safetensors.*truncated or corrupt"):
        load_model(path, dtype="f32")


def test_error_missing_shard(tmp_path):
    path, _ = make_tiny_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path,
                                 max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, dtype="f32")
    assert shard.name in _one_line(exc) and "index" in str(exc.value)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io

    from mistralrs.progress import progress

    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe: nothing is drawn
    with progress(3, "loading") as bar:
        bar.update()
    assert type(bar).__name__ == "_Silent"


def test_spinner_for_steps_of_unknown_length(monkeypatch):
    """Compiling the native kernels shows a spinner with the elapsed time on a terminal only."""
    import io
    import time

    from mistralrs.progress import spinner

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("MISTRALRS_NO_PROGRESS", raising=False)
    term = Terminal()
    with spinner("building native CPU kernels", term, interval=0.01):
        time.sleep(0.1)
    drawn = term.getvalue()
    assert drawn.count("building native CPU kernels (0 s)") >= 2 and drawn.endswith("\r\033[K")  # erased at the end
    pipe = io.StringIO()
    with spinner("building native CPU kernels", pipe):
        pass
    assert pipe.getvalue() == ""
    monkeypatch.setenv("MISTRALRS_NO_PROGRESS", "1")
    quiet = Terminal()
    with spinner("building", quiet):
        pass
    assert quiet.getvalue() == ""
