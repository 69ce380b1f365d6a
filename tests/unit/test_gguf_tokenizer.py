"""mistralrs.gguf.tokenizer: a tokenizers.Tokenizer rebuilt from GGUF metadata.

Small tokenizers are trained here in the shape of Llama 3 / Qwen 2 (byte-level BPE), Llama 2 /
Mistral (SentencePiece BPE with byte fallback) and BERT (WordPiece), converted to GGUF metadata
the way llama.cpp's converter does (tests/helpers/gguf_vocab.py), and the tokenizer rebuilt from
that metadata must encode and decode exactly like the original. SentencePiece vocabularies are
also checked against a port of llama.cpp's own SentencePiece tokenizer.

With LLAMA_CPP_SRC pointing at a llama.cpp source tree, every models/ggml-vocab-*.gguf that has
.inp/.out test data is checked against llama.cpp's recorded token ids as well.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.tokenizer import PRE_TOKENIZERS, GgufTokenizer, tokenizer_from_gguf
from tests.helpers.gguf_vocab import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    convert_to_gguf,
    llama_cpp_spm_tokenize,
    read_metadata,
    write_byte_level_tokenizer,
    write_spm_tokenizer,
    write_wordpiece_tokenizer,
)

pytest.importorskip("gguf")
pytest.importorskip("transformers")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)

TEXTS = [
    "",
    " ",
    "Hello world!",
    " Hello World",
    "  leading and trailing spaces   ",
    "Café, naïve, déjà vu — “quotes” … Ångström",
    "中文分词测试。你好，世界！漢字かなカナ한국어",
    "Emoji 😀🎉🚀 and ❤️ and 👍🏽👍🏽 skin tone 🦙",
    "def add(a, b):\n    return a + b\n\n\tTabs\t\there\r\nCRLF\n\n\n",
    "x = [1, 22, 333, 4444, 55555, 1234567890]; y = {'a': 3.14159}",
    "I've we're THEY'LL she'd It's I'M",
    "   \n\n  \t \n",
    "unknown chars: ☃ ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ \x00\x07",
]


def _special_texts(*tokens: str) -> list[str]:
    joined = " ".join(tokens)
    return [joined, f"{tokens[0]}Hello{tokens[-1]} world", f"a {tokens[0]} b{tokens[-1]}\n{tokens[0]}  c"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (HF tokenizer directory, GGUF metadata read back with gguf.GGUFReader)."""
    base = tmp_path_factory.mktemp("gguf_tok")
    out: dict[str, tuple[Path, dict]] = {}

    def add(name: str, directory: Path, kind: str, **kwargs) -> None:
        path = convert_to_gguf(directory, base / f"{name}.gguf", kind, **kwargs)
        out[name] = (directory, read_metadata(path))

    llama3 = write_byte_level_tokenizer(
        base / "llama3", split=LLAMA3_SPLIT, ignore_merges=True, bos="<|begin_of_text|>", eos="<|eot_id|>",
        specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"),
        prepend_bos=True, chat_template=LLAMA3_TEMPLATE,
    )
    add("llama3", llama3, "gpt2", pre="llama-bpe")
    qwen2 = write_byte_level_tokenizer(
        base / "qwen2", split=QWEN2_SPLIT, ignore_merges=False, bos=None, eos="<|im_end|>",
        specials=("<|endoftext|>", "<|im_start|>"), added=("<think>", "</think>"), chat_template=CHATML_TEMPLATE,
    )
    add("qwen2", qwen2, "gpt2", pre="qwen2")
    spm = write_spm_tokenizer(base / "spm", control=("[INST]", "[/INST]"), user_defined=("<tool_call>", "</tool_call>"))
    add("spm_hf", spm, "llama_hf")
    add("spm", spm, "sentencepiece")
    add("spm_noprefix", spm, "sentencepiece", arch="gemma2", extra={"tokenizer.ggml.add_space_prefix": False})
    bert = write_wordpiece_tokenizer(base / "bert")
    add("bert", bert, "bert", pre="bert-bge")
    return out


def _original(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def _texts_for(name: str) -> list[str]:
    specials = {
        "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"),
        "qwen2": ("<|im_start|>", "<think>", "</think>", "<|im_end|>"),
        "spm": ("<s>", "[INST]", "<tool_call>", "[/INST]", "</tool_call>", "</s>"),
        "bert": ("[CLS]", "[MASK]", "[SEP]"),
    }[name.split("_")[0]]
    return TEXTS + _special_texts(*specials)


# ------------------------------------------------------------------------- parity with the original
@pytest.mark.parametrize("name", ["llama3", "qwen2", "spm_hf", "spm", "bert"])
def test_rebuilt_tokenizer_matches_the_original(converted, name):
    directory, metadata = converted[name]
    original = _original(directory)
    rebuilt = tokenizer_from_gguf(metadata, source=f"{name}.gguf").tokenizer
    assert rebuilt.get_vocab_size() == original.get_vocab_size()
    for text in _texts_for(name):
        for add_special in (False, True):
            want = original.encode(text, add_special_tokens=add_special).ids
            got = rebuilt.encode(text, add_special_tokens=add_special).ids
            assert got == want, (text, add_special)
        for skip in (False, True):
            assert rebuilt.decode(want, skip_special_tokens=skip) == original.decode(want, skip_special_tokens=skip)
    assert rebuilt.encode("Hello world", "second part").ids == original.encode("Hello world", "second part").ids


@pytest.mark.parametrize("name", ["spm", "spm_noprefix"])
def test_sentencepiece_vocab_tokenizes_like_llama_cpp(converted, name):
    """Merges recovered from the scores reproduce llama.cpp's SentencePiece merge loop, with and
    without parsing special tokens, and without the space prefix (Gemma)."""
    _, metadata = converted[name]
    tok = tokenizer_from_gguf(metadata).tokenizer
    rng = random.Random(1234)
    pieces = [t for t in metadata["tokenizer.ggml.tokens"] if not t.startswith("<0x")] + list(" \n\t.,é😀")
    texts = _texts_for("spm") + ["".join(rng.choice(pieces).replace("▁", " ") for _ in range(rng.randint(1, 12)))
                                 for _ in range(300)]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == llama_cpp_spm_tokenize(metadata, text), text
    tok.encode_special_tokens = True  # llama.cpp's parse_special=false: only user-defined tokens are matched
    for text in texts:
        want = llama_cpp_spm_tokenize(metadata, text, parse_special=False)
        assert tok.encode(text, add_special_tokens=False).ids == want, text


def test_sentencepiece_space_prefix_and_bos(converted):
    _, metadata = converted["spm"]
    gt = tokenizer_from_gguf(metadata)
    tok = gt.tokenizer
    assert gt.add_bos_token and not gt.add_eos_token
    assert tok.encode("hi", add_special_tokens=True).ids[0] == gt.bos_token_id == 1
    assert tok.encode("hi").tokens[1].startswith("▁")
    assert tok.decode(tok.encode(" two  spaces").ids) == " two  spaces"
    noprefix = tokenizer_from_gguf(converted["spm_noprefix"][1]).tokenizer
    assert not noprefix.encode("hi", add_special_tokens=False).tokens[0].startswith("▁")
    assert noprefix.decode(noprefix.encode(" a b").ids) == " a b"


def test_token_types_decide_added_tokens(converted):
    _, metadata = converted["qwen2"]
    tok = tokenizer_from_gguf(metadata).tokenizer
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    assert added["<|im_end|>"].special and added["<|endoftext|>"].special  # CONTROL
    assert not added["<think>"].special  # USER_DEFINED: matched whole, kept when decoding
    ids = tok.encode("<think>x</think><|im_end|>", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"
    _, metadata = converted["spm"]
    tok = tokenizer_from_gguf(metadata).tokenizer
    assert "<0x41>" not in {t.content for t in tok.get_added_tokens_decoder().values()}  # BYTE stays in the vocab
    assert tok.encode("☃", add_special_tokens=False).tokens == ["▁", "<0xE2>", "<0x98>", "<0x83>"]


def test_embedded_tokenizer_json_is_used_as_is(converted):
    directory, metadata = converted["qwen2"]
    original = _original(directory)
    embedded = {**metadata, "tokenizer.huggingface.json": (directory / "tokenizer.json").read_text(encoding="utf-8"),
                "tokenizer.ggml.pre": "gpt-2"}  # a wrong pre-tokenizer name must not matter then
    gt = tokenizer_from_gguf(embedded)
    for text in _texts_for("qwen2"):
        assert gt.tokenizer.encode(text).ids == original.encode(text).ids
    assert gt.eos_token == "<|im_end|>"


def test_gemma4_style_bpe_on_raw_utf8(converted):
    """tokenizer.ggml.model "gemma4": merges stored in the file, spaces as "▁" without a
    prefix, newline runs split off, byte fallback to <0xXX>; add_bos forced on (llama.cpp)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers

    directory, metadata = converted["spm"]
    doc = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [" ".join(m) for m in doc["model"]["merges"]]
    gemma4 = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.scores"}
    gemma4.update({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.merges": merges,
                   "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False})
    gt = tokenizer_from_gguf(gemma4)
    reference = Tokenizer(models.BPE(vocab=doc["model"]["vocab"], merges=[tuple(m) for m in doc["model"]["merges"]],
                                     unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    reference.normalizer = normalizers.Replace(" ", "▁")
    reference.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert gt.add_bos_token
    for text in TEXTS:
        want = reference.encode(text).ids
        assert gt.tokenizer.encode(text, add_special_tokens=False).ids == want, text
        assert gt.tokenizer.decode(want) == reference.decode(want)


# --------------------------------------------------------------------------- special ids, template
def test_special_ids_template_and_flags(converted):
    _, metadata = converted["llama3"]
    gt = tokenizer_from_gguf(metadata)
    tok = gt.tokenizer
    assert gt.bos_token == "<|begin_of_text|>" and gt.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert gt.eos_token == "<|eot_id|>" and gt.eos_token_ids == [tok.token_to_id("<|eot_id|>")]
    assert gt.add_bos_token and not gt.add_eos_token
    assert gt.chat_template == LLAMA3_TEMPLATE
    assert gt.model == "gpt2" and gt.pre == "llama-bpe"
    eom = tok.token_to_id("<|eom_id|>")
    end = tok.token_to_id("<|end_of_text|>")
    more = tokenizer_from_gguf({**metadata, "tokenizer.ggml.eot_token_id": end, "tokenizer.ggml.eom_token_id": eom})
    assert more.eos_token_ids == [gt.eos_token_id, end, eom]
    assert set(gt.eog_token_ids) >= {gt.eos_token_id, end, eom}  # llama.cpp also goes by the token text

    _, metadata = converted["qwen2"]
    gt = tokenizer_from_gguf(metadata)
    assert gt.bos_token_id is None and not gt.add_bos_token  # llama.cpp's default for qwen2
    assert gt.tokenizer.encode("hi", add_special_tokens=True).ids == gt.tokenizer.encode("hi").ids


def test_named_chat_templates():
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
        "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3,
        "tokenizer.chat_template": "{{ 'default' }}", "tokenizer.chat_template.tool_use": "{{ 'tools' }}",
        "tokenizer.chat_templates": ["tool_use"],
    }
    gt = tokenizer_from_gguf(metadata)
    assert gt.chat_template == "{{ 'default' }}"
    assert gt.chat_templates == {"tool_use": "{{ 'tools' }}"}
    assert gt.tokenizer_config()["chat_template"] == [
        {"name": "default", "template": "{{ 'default' }}"}, {"name": "tool_use", "template": "{{ 'tools' }}"},
    ]
    assert gt.tokenizer.encode("abab<|end|>").tokens == ["ab", "ab", "<|end|>"]


def test_ordinary_tokens_are_not_named_special():
    """A pad id pointing at an ordinary token must not make that token special."""
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["!", "a", "!!", "<|endoftext|>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
        "tokenizer.ggml.merges": ["! !"], "tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
    }
    gt = tokenizer_from_gguf(metadata)
    assert gt.pad_token_id == 0 and "pad_token" not in gt.tokenizer_config()
    assert gt.tokenizer_config()["eos_token"] == "<|endoftext|>"


# --------------------------------------------------------------------- the files mistralrs loads
@pytest.mark.parametrize("name", ["llama3", "qwen2", "spm"])
def test_hf_files_load_with_mistralrs_tokenizer(converted, name, tmp_path):
    from mistralrs.chat_template import ChatTemplate
    from mistralrs.tokenization import Tokenizer

    _, metadata = converted[name]
    gt = tokenizer_from_gguf(metadata)
    directory = gt.to_hf_files(tmp_path / "tok")
    assert {p.name for p in directory.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    for tok in (Tokenizer.from_dir(directory), Tokenizer(gt.tokenizer, gt.tokenizer_config())):
        assert tok.bos_token == gt.bos_token and tok.eos_token == gt.eos_token
        assert tok.bos_token_id == gt.bos_token_id and tok.eos_token_id == gt.eos_token_id
        assert tok.add_bos_token == gt.add_bos_token
        for text in _texts_for(name):
            for add_special in (False, True):
                assert tok.encode(text, add_special) == gt.tokenizer.encode(text, add_special_tokens=add_special).ids
    template = ChatTemplate.load(directory)
    assert template.available == (gt.chat_template is not None)
    if gt.chat_template is not None:
        assert template.template == gt.chat_template
        rendered = template.render([{"role": "user", "content": "hi"}])
        assert "hi" in rendered


def test_hf_files_load_with_transformers(converted, tmp_path):
    from transformers import AutoTokenizer

    _, metadata = converted["llama3"]
    gt = tokenizer_from_gguf(metadata)
    hf = AutoTokenizer.from_pretrained(gt.to_hf_files(tmp_path / "tok"))
    for text in _texts_for("llama3"):
        assert hf.encode(text) == gt.tokenizer.encode(text).ids
    assert hf.eos_token == gt.eos_token


# ---------------------------------------------------------------------------- inputs and errors
def test_numpy_arrays_and_lists_give_the_same_tokenizer(converted):
    _, metadata = converted["spm"]
    as_numpy = {
        **metadata,
        "tokenizer.ggml.scores": np.asarray(metadata["tokenizer.ggml.scores"], dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(metadata["tokenizer.ggml.token_type"], dtype=np.int32),
    }
    a, b = tokenizer_from_gguf(metadata).tokenizer, tokenizer_from_gguf(as_numpy).tokenizer
    for text in TEXTS:
        assert a.encode(text).ids == b.encode(text).ids


def test_fast_metadata_reader_agrees_with_gguf_reader(converted, tmp_path):
    from tests.helpers.gguf_metadata import read_gguf_metadata

    directory, metadata = converted["qwen2"]
    path = convert_to_gguf(directory, tmp_path / "q.gguf", "gpt2", pre="qwen2")
    fast = read_gguf_metadata(path)
    assert fast.keys() == metadata.keys()
    for key, value in metadata.items():
        got = fast[key]
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == value, key


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        ({}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}, "'rwkv'"),
        ({"tokenizer.ggml.model": "none", "tokenizer.ggml.tokens": ["a"]}, "no vocabulary"),
        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "tokenizer.ggml.merges"),
    ],
)
def test_missing_or_unknown_tokenizer_is_a_one_line_error(metadata, needle):
    with pytest.raises(ModelLoadError) as info:
        tokenizer_from_gguf(metadata, source="model-Q4_K_M.gguf")
    message = str(info.value)
    assert "\n" not in message
    assert "model-Q4_K_M.gguf" in message and needle in message and "--tok-model-id" in message


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(converted, caplog):
    _, metadata = converted["qwen2"]
    with caplog.at_level(logging.WARNING, logger="mistralrs.gguf"):
        gt = tokenizer_from_gguf({**metadata, "tokenizer.ggml.pre": "brand-new-model"}, source="new.gguf")
    assert any("brand-new-model" in r.getMessage() and "new.gguf" in r.getMessage() for r in caplog.records)
    assert gt.tokenizer.decode(gt.tokenizer.encode("Hello  world 123").ids) == "Hello  world 123"


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_compiles_and_round_trips(pre):
    tokens = [chr(c) for c in range(33, 127)]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.merges": ["a b"]}
    if not PRE_TOKENIZERS[pre].byte_level:
        metadata["tokenizer.ggml.tokens"] = tokens + ["▁", "ab", *(f"<0x{b:02X}>" for b in range(256))]
    else:
        from tokenizers.pre_tokenizers import ByteLevel

        metadata["tokenizer.ggml.tokens"] = sorted(ByteLevel.alphabet()) + ["ab"]
    gt = tokenizer_from_gguf(metadata)
    assert isinstance(gt, GgufTokenizer)
    text = "Hello, WORLD! It's 12345 and 3.14 — 中文 😀\n\n  \tend"
    assert gt.tokenizer.decode(gt.tokenizer.encode(text).ids) == text


# ------------------------------------------------------------------ llama.cpp's own vocab files
def _llama_cpp_vocab_files() -> list[Path]:
    root = os.environ.get("LLAMA_CPP_SRC")
    if not root:
        return []
    return sorted(p for p in (Path(root) / "models").glob("ggml-vocab-*.gguf") if Path(f"{p}.inp").is_file())


def _read_vocab_test(path: Path) -> list[tuple[str, list[int]]]:
    """tests/test-tokenizer-0.cpp's format: inputs separated by "\\n__ggml_vocab_test__\\n",
    one line of space-separated token ids per input."""
    sep = "\n__ggml_vocab_test__\n"
    raw = Path(f"{path}.inp").read_text(encoding="utf-8")
    if raw.endswith(sep):
        raw = raw[: -len(sep)]
    inputs = raw.split(sep)
    outputs = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    if outputs and outputs[-1] == "":
        outputs.pop()
    assert len(inputs) == len(outputs), path
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, outputs)]


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_SRC"), reason="set LLAMA_CPP_SRC to a llama.cpp source tree")
@pytest.mark.parametrize("path", _llama_cpp_vocab_files(), ids=lambda p: p.name)
def test_llama_cpp_vocab_files(path):
    """Same ids as llama.cpp's test-tokenizer-0 (add_special=false, parse_special=false).
    The metadata is read with the fast reader: gguf.GGUFReader takes ~45 s on Gemma 4's vocab."""
    from tests.helpers.gguf_metadata import read_gguf_metadata

    tok = tokenizer_from_gguf(read_gguf_metadata(path), source=path.name).tokenizer
    tok.encode_special_tokens = True
    bad = [(text, want, tok.encode(text, add_special_tokens=False).ids) for text, want in _read_vocab_test(path)]
    bad = [case for case in bad if case[1] != case[2]]
    assert not bad, bad[:3]
