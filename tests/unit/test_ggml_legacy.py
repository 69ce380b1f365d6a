"""Legacy GGML files (llama.cpp's ``ggml``/``ggmf``/``ggjt`` Llama formats before GGUF).

CI has no legacy files and llama.cpp no longer writes them, so `write_legacy` below writes them
following ``convert_llama_ggml_to_gguf.py``'s reader (header, hyper-parameters, vocabulary with
scores, tensor headers, 32-byte data alignment in ggjt) from a tiny HF Llama checkpoint, with the
tensors named and Q/K rows permuted as llama.cpp's old ``convert.py`` wrote them; quantized blocks
come from the `gguf` package (a dev dependency). Checked: an F32 file gives the safetensors model's
logits, a Q8_0 file the very block bytes of the GGUF Q8_0 file (and of ``--isq q8_0``), Q4_0 those
of ``--isq q4_0``, the metadata and tokenizer the converter would write; ``--gqa``, the CLI, the
Python API and from-config; bad files and flags are one-line errors.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mistralrs.errors import ConfigError, ModelLoadError

gguf = pytest.importorskip("gguf")

MAGIC = {"ggml": b"lmgg", "ggmf": b"fmgg", "ggjt": b"tjgg"}
F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8
FTYPE = {F32: 0, F16: 1, Q4_0: 2, Q8_0: 7}

HF_TO_LEGACY = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
PIECES = ["▁", "e", "h", "i", "l", "o", "t", "n", "r", "s", "a", "▁h", "hi", "▁hi", "he", "ll", "lo", "llo",
          "hello", "▁hello", "th", "▁t", "▁th", "the", "▁the", "in", "er", "an", "on", "re", "at", "▁a", "▁an",
          "▁s", "▁o", "▁i", "▁in", "▁on", "▁re", "st", "es", "en", "or", "▁there", "ar", "al", "ea", "ne", "nt",
          "te", "ti", "to", "▁to", "ra", "ri", "ro", "se", "si", "so", "ta", "tr"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (``convert.py``'s ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def legacy_vocab(n_vocab: int) -> list[tuple[bytes, float]]:
    """A SentencePiece-shaped vocabulary as old llama.cpp files stored it: <unk> as ' ⁇ ', the
    control tokens empty, 256 raw byte tokens, then pieces with spaces (not '▁')."""
    out: list[tuple[bytes, float]] = [(" \u2047 ".encode(), 0.0), (b"", 0.0), (b"", 0.0)]
    out += [(bytes([b]), 0.0) for b in range(256)]
    for i in range(n_vocab - len(out)):
        piece = PIECES[i] if i < len(PIECES) else f"x{i}"
        out.append((piece.replace("▁", " ").encode(), -float(i)))
    return out[:n_vocab]


def legacy_tensors(hf_dir: Path) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """(config, [(legacy name, float32 array)]) of a HF Llama checkpoint, Q/K permuted."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    weights = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    out = [("tok_embeddings.weight", weights["model.embed_tokens.weight"]), ("norm.weight", weights["model.norm.weight"]),
           ("output.weight", weights["lm_head.weight"])]
    for i in range(cfg["num_hidden_layers"]):
        for hf, old in HF_TO_LEGACY.items():
            t = weights[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = torch.from_numpy(_permute(t.numpy(), n_head))
            elif hf == "self_attn.k_proj":
                t = torch.from_numpy(_permute(t.numpy(), n_kv))
            out.append((f"layers.{i}.{old}.weight", t))
    return cfg, [(name, t.float().numpy()) for name, t in out]


def _encode(arr: np.ndarray, qtype: int) -> bytes:
    if arr.ndim == 1 or qtype == F32:
        return arr.astype(np.float32).tobytes()
    if qtype == F16:
        return arr.astype(np.float16).tobytes()
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType(qtype)).tobytes()


def write_legacy(hf_dir: Path, out: Path, *, qtype: int = F32, kind: str = "ggjt", version: int = 3,
                 vocab: list[tuple[bytes, float]] | None = None, extra: list[tuple[str, np.ndarray]] = ()) -> Path:
    """A legacy GGML file of the checkpoint in `hf_dir`: 1-D tensors F32, matrices `qtype`."""
    cfg, tensors = legacy_tensors(hf_dir)
    vocab = vocab or legacy_vocab(cfg["vocab_size"])
    buf = bytearray(MAGIC[kind])
    if kind != "ggml":
        buf += struct.pack("<I", version)
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    buf += struct.pack("<7I", len(vocab), n_embd, 256, n_head, cfg["num_hidden_layers"], n_embd // n_head,
                       FTYPE[qtype])
    for text, score in vocab:
        buf += struct.pack("<I", len(text)) + text
        if kind != "ggml":
            buf += struct.pack("<f", score)
    for name, arr in [*tensors, *extra]:
        t = qtype if arr.ndim > 1 else F32
        dims = arr.shape[::-1]
        raw = name.encode()
        buf += struct.pack("<3I", len(dims), len(raw), t) + struct.pack(f"<{len(dims)}I", *dims) + raw
        if kind == "ggjt":
            buf += b"\0" * (-len(buf) % 32)
        buf += _encode(arr, t)
    out.write_bytes(bytes(buf))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with 4 heads and 2 KV heads (--gqa 2), its RMS epsilon the converter's default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.parity import make_tiny_hf_model

    path, _ = make_tiny_hf_model(LlamaConfig, LlamaForCausalLM, tmp_path_factory.mktemp("ggml") / "llama",
                                 rms_norm_eps=5e-6)
    return path


@pytest.fixture(scope="module")
def reference(tiny):
    from mistralrs.loading import load_model

    return load_model(tiny, dtype=torch.float32)


def _ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(3))


def _load(path: Path, **kw):
    from mistralrs.gguf.loading import load_gguf

    return load_gguf(path, dtype=torch.float32, **kw)


def test_f32_ggjt_v3_gives_the_safetensors_logits(tiny, reference, tmp_path):
    from tests.helpers.parity import our_logits

    loaded = _load(write_legacy(tiny, tmp_path / "tiny.ggmlv3.f32.bin"), gqa=2)
    try:
        assert loaded.arch.name == reference.arch.name == "llama"
        assert loaded.config["num_key_value_heads"] == 2
        ids = _ids()
        diff = float((our_logits(loaded, ids) - our_logits(reference, ids)).abs().max())
        assert diff <= 1e-4, diff
    finally:
        loaded.gguf.close()


@pytest.mark.parametrize("kind,version", [("ggml", 1), ("ggmf", 1), ("ggjt", 1), ("ggjt", 2)])
def test_older_containers_load_unquantized(tiny, reference, tmp_path, kind, version):
    """Unversioned ggml (no scores, no padding: F16 tensors at odd offsets), ggmf, ggjt v1/v2."""
    from tests.helpers.parity import our_logits

    loaded = _load(write_legacy(tiny, tmp_path / f"{kind}{version}.bin", qtype=F16, kind=kind, version=version), gqa=2)
    try:
        ids = _ids(12)
        cos = torch.nn.functional.cosine_similarity(our_logits(loaded, ids).flatten(),
                                                    our_logits(reference, ids).flatten(), dim=0)
        assert float(cos) > 0.9999
        assert loaded.gguf.files[0].container == (kind if kind == "ggml" else f"{kind} v{version}")
    finally:
        loaded.gguf.close()


def _qweights(loaded) -> dict[str, torch.Tensor]:
    return {k: v for k, v in loaded.model.state_dict().items() if k.endswith("qweight")}


def test_q8_0_holds_the_gguf_q8_0_block_bytes(tiny, tmp_path):
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan
    from tests.helpers.gguf_writer import write_gguf

    legacy = _load(write_legacy(tiny, tmp_path / "tiny.ggmlv3.q8_0.bin", qtype=Q8_0), gqa=2)
    modern = _load(write_gguf(tiny, tmp_path / "tiny-Q8_0.gguf", outtype="q8_0"))
    isq = load_model(tiny, dtype=torch.float32, quant_method_for=IsqPlan("q8_0").method_for)
    try:
        ours, gguf_state = legacy.model.state_dict(), modern.model.state_dict()
        assert ours.keys() == gguf_state.keys()
        for key, value in gguf_state.items():
            assert torch.equal(ours[key], value), key  # every tensor, quantized or not
        q = _qweights(legacy)
        assert len(q) >= 2 * 4
        isq_q = _qweights(isq)
        assert all(torch.equal(q[k], isq_q[k]) for k in isq_q if k in q)
    finally:
        legacy.gguf.close()
        modern.gguf.close()


def test_q4_0_holds_the_isq_q4_0_block_bytes(tiny, reference, tmp_path):
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan
    from tests.helpers.parity import our_logits

    legacy = _load(write_legacy(tiny, tmp_path / "tiny.ggmlv3.q4_0.bin", qtype=Q4_0), gqa=2)
    isq = load_model(tiny, dtype=torch.float32, quant_method_for=IsqPlan("q4_0").method_for)
    try:
        q, isq_q = _qweights(legacy), _qweights(isq)
        # the LM head is promoted to a higher type by --isq's sensitive-tensor policy
        shared = [k for k in isq_q if k in q and k != "lm_head.qweight"]
        assert len(shared) >= 2 * 4
        for k in shared:
            assert torch.equal(q[k], isq_q[k]), k
        ids = _ids(12)
        cos = torch.nn.functional.cosine_similarity(our_logits(legacy, ids).flatten(),
                                                    our_logits(reference, ids).flatten(), dim=0)
        assert float(cos) > 0.9  # 4-bit everything (embeddings and head too) on random weights: ~0.95
    finally:
        legacy.gguf.close()


def test_metadata_tensors_and_tokenizer_as_the_converter_writes_them(tiny, tmp_path):
    from mistralrs.gguf.ggml_legacy import open_ggml
    from mistralrs.gguf.tokenizer import tokenizer_from_gguf
    from tests.helpers.gguf_vocab import llama_cpp_spm_tokenize

    path = write_legacy(tiny, tmp_path / "tiny.bin", qtype=Q8_0, extra=[("rope.freqs", np.ones(8, np.float32))])
    with open_ggml(path, gqa=2) as m:
        md = m.metadata
        assert m.architecture == "llama" and m.path == path
        assert {k: md[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                              "feed_forward_length", "rope.dimension_count",
                                              "attention.head_count", "attention.head_count_kv")} == {
            "context_length": 2048, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
            "rope.dimension_count": 16, "attention.head_count": 4, "attention.head_count_kv": 2}
        assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(5e-6)
        assert md["general.description"] == "converted from legacy GGJTv3 MOSTLY_Q8_0 format"
        tokens, types = md["tokenizer.ggml.tokens"], list(md["tokenizer.ggml.token_type"])
        assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
        assert tokens[3] == "<0x00>" and tokens[3 + 0x41] == "<0x41>" and set(types[3:259]) == {6}
        assert tokens[259:262] == ["▁", "e", "h"] and tokens[259 + PIECES.index("▁hello")] == "▁hello"
        assert md["tokenizer.ggml.scores"][259 + 5] == -5.0
        names = set(m.tensors)
        assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
                "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight", "blk.1.attn_norm.weight",
                "blk.1.ffn_gate.weight", "blk.1.ffn_down.weight", "blk.1.ffn_up.weight",
                "blk.1.ffn_norm.weight"} <= names
        assert len(names) == 3 + 2 * 9  # rope.freqs is dropped
        info = m.tensors["blk.0.ffn_gate.weight"]
        assert info.shape == (128, 64) and info.type_name == "Q8_0" and info.offset % 32 == 0
        assert tuple(m.tensor("blk.0.ffn_gate.weight").shape) == (128, 64 // 32 * 34)
        tok = tokenizer_from_gguf(md, source=str(path))
        for text in ("hello hi there", "the héllo"):  # é: byte tokens
            ids = tok.tokenizer.encode(text).ids
            assert ids == [1, *llama_cpp_spm_tokenize(md, text)]  # BOS, then llama.cpp's own tokens
            assert tok.tokenizer.decode(ids, skip_special_tokens=True).strip() == text


def test_wrong_gqa_is_a_one_line_config_error(tiny, tmp_path):
    from mistralrs.gguf.ggml_legacy import open_ggml

    path = write_legacy(tiny, tmp_path / "tiny.bin")
    with pytest.raises(ConfigError, match=r"--gqa 1 does not fit this model: .* 2 KV heads for 4 attention heads; "
                                          r"pass --gqa 2"):
        open_ggml(path)
    with pytest.raises(ConfigError, match="--gqa 3 does not divide the model's 4 attention heads"):
        open_ggml(path, gqa=3)
    with pytest.raises(ConfigError, match="--gqa must be a positive integer"):
        open_ggml(path, gqa=0)


def _refused(path: Path, pattern: str) -> str:
    from mistralrs.gguf.ggml_legacy import open_ggml

    with pytest.raises(ModelLoadError, match=pattern) as info:
        open_ggml(path, gqa=2)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_old_quantized_layouts_are_refused(tiny, tmp_path):
    _refused(write_legacy(tiny, tmp_path / "v1.bin", qtype=Q8_0, version=1),
             "a ggjt v1 file with Q8_0 tensors: llama.cpp's quantization formats changed in ggjt v2")
    _refused(write_legacy(tiny, tmp_path / "ggmf.bin", qtype=Q4_0, kind="ggmf", version=1),
             "a ggmf v1 file with Q4_0 tensors")
    _refused(write_legacy(tiny, tmp_path / "v2.bin", qtype=Q4_0, version=2),
             "a ggjt v2 file with Q4_0 tensors: Q4_0, Q4_1 and Q8_0 changed again in ggjt v3")


def test_bad_files_are_one_line_errors(tiny, tmp_path):
    good = write_legacy(tiny, tmp_path / "good.bin", qtype=Q8_0).read_bytes()

    def variant(name: str, data: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p

    _refused(variant("v4.bin", good[:4] + struct.pack("<I", 4) + good[8:]), "ggjt version 4 is not a legacy GGML version")
    _refused(variant("cut-vocab.bin", good[:200]), "truncated GGML file .* inside the vocabulary of 320 tokens")
    _refused(variant("cut-vocab2.bin", good[:2800]), "truncated GGML file .* inside vocabulary entry")
    _refused(variant("cut-data.bin", good[:-100]), r"tensor 'layers.1.ffn_norm.weight' data .* beyond the end")
    _refused(variant("cut-header.bin", good[:30]), "truncated GGML file .* inside the hyper-parameters")
    _refused(variant("zero.bin", good[:8] + struct.pack("<I", 0) + good[12:]), "implausible hyper-parameters")
    # a tensor of a type legacy files never held (Q4_2 was removed; 20 = IQ4_NL is GGUF-era)
    cfg_ok = write_legacy(tiny, tmp_path / "odd.bin", extra=[("layers.0.extra.weight", np.ones((2, 32), np.float32))])
    _refused(cfg_ok, "tensor 'layers.0.extra.weight' is not part of a Llama model")


def test_gguf_reader_still_names_legacy_files(tiny, tmp_path):
    from mistralrs.gguf.reader import GgufFile

    path = write_legacy(tiny, tmp_path / "tiny.bin")
    with pytest.raises(ModelLoadError, match="a legacy GGML file, not GGUF"):
        GgufFile.open(path)


# ------------------------------------------------------------------------- CLI, API, config


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "mistralrs", "run", *argv], capture_output=True, text=True,
                          timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def legacy_q8(tiny, tmp_path_factory):
    return write_legacy(tiny, tmp_path_factory.mktemp("ggml-cli") / "tiny-llama.ggmlv3.q8_0.bin", qtype=Q8_0)


def test_cli_runs_a_legacy_file(legacy_q8):
    common = ("-i", "hi", "--max-tokens", "3", "--temperature", "0")
    out = _run("-m", str(legacy_q8), "--format", "ggml", "--gqa", "2", *common)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    # the magic decides: without --format the file is recognised too
    again = _run("-m", str(legacy_q8), "--gqa", "2", *common)
    assert again.returncode == 0, again.stderr
    assert again.stdout == out.stdout


def test_cli_flag_errors_exit_2(legacy_q8):
    wrong = _run("-m", str(legacy_q8), "--format", "ggml", "-i", "hi", "--max-tokens", "3")
    assert wrong.returncode == 2, wrong.stderr
    assert "pass --gqa 2" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    bad = _run("-m", str(legacy_q8), "--format", "ggml", "--gqa", "0", "-i", "hi")
    assert bad.returncode == 2 and "--gqa" in bad.stderr
    unnamed = _run("-m", str(legacy_q8.parent), "--format", "ggml", "-i", "hi")
    assert unnamed.returncode != 0 and "name the legacy GGML file" in unnamed.stderr
    for r in (wrong, unnamed):
        assert len([line for line in r.stderr.splitlines() if "error" in line.lower()]) == 1, r.stderr


def test_runner_which_ggml(legacy_q8):
    from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which

    runner = Runner(Which.GGML(quantized_model_id=str(legacy_q8.parent), quantized_filename=legacy_q8.name, gqa=2,
                               dtype="f32"))
    try:
        service = runner.service
        assert service.loaded.config["num_key_value_heads"] == 2
        assert not service.chat_template.available  # legacy files carry no template
        out = runner.send_completion_request(CompletionRequest(prompt="hello", max_tokens=3, temperature=0.0))
        assert out.usage.completion_tokens >= 1
        with pytest.raises(Exception, match="no chat template"):
            runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "hi"}], max_tokens=2))
    finally:
        runner.service.shutdown()
    with pytest.raises(ConfigError, match="gqa"):
        Which.GGML(quantized_model_id=str(legacy_q8), gqa=0)


def test_from_config_gqa(legacy_q8, tmp_path):
    from mistralrs.config import load_config, service_options

    toml = tmp_path / "c.toml"
    toml.write_text(f'[[models]]\nmodel_id = "{legacy_q8}"\n[models.format]\nformat = "ggml"\ngqa = 2\n')
    cfg = load_config(toml)
    opts = service_options(cfg, cfg.models[0])
    assert opts.format == "ggml" and opts.gqa == 2
    toml.write_text(f'[[models]]\nmodel_id = "{legacy_q8}"\n[models.format]\ngqa = 0\n')
    with pytest.raises(ConfigError, match="format.gqa must be a positive integer"):
        load_config(toml)
